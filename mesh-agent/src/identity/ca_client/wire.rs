//! Istio's CA API on the wire: `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! (`security/proto/istioca.proto` in istio/api), a unary gRPC call over HTTP/2.
//!
//! Written by hand instead of with tonic + prost: the API is two messages of three fields, the
//! framing of a unary call is a 5-byte prefix and a `grpc-status` trailer, and the tunnel already
//! carries an HTTP/2 stack (h2) and the TLS configuration we need; tonic would add about thirty
//! crates (axum, tower layers, prost) to a 2-core build for that. Unknown fields are skipped as
//! protobuf requires, so clients built from Istio's `.proto` (ztunnel, istio-agent) interoperate.
//!
//! ```text
//! message IstioCertificateRequest {
//!   string csr = 1;                        // PEM PKCS#10
//!   int64 validity_duration = 3;           // seconds
//!   google.protobuf.Struct metadata = 4;   // ignored by nodemesh
//! }
//! message IstioCertificateResponse {
//!   repeated string cert_chain = 200;      // PEM, leaf first, root last
//! }
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The request path of the one method.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The content type of gRPC requests and responses.
pub const GRPC_CONTENT_TYPE: &str = "application/grpc";
/// Largest message either side accepts: a CSR is about 1 KiB, a chain a few KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// gRPC status codes used by the CA (grpc/doc/statuscodes.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Code::Ok,
            3 => Code::InvalidArgument,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            16 => Code::Unauthenticated,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated protobuf message")]
    Truncated,
    #[error("protobuf varint longer than 10 bytes")]
    VarintTooLong,
    #[error("protobuf wire type {0} is not supported")]
    WireType(u64),
    #[error("field {0} is not valid UTF-8")]
    Utf8(u32),
    #[error("gRPC message compressed (flag {0}); nodemesh sends and accepts uncompressed messages")]
    Compressed(u8),
    #[error("gRPC message of {0} bytes exceeds the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("gRPC body has {0} bytes after the message")]
    Trailing(usize),
}

/// `IstioCertificateRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateRequest {
    pub csr: String,
    pub validity_duration: i64,
}

/// `IstioCertificateResponse`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateResponse {
    pub cert_chain: Vec<String>,
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = 0u64;
    for i in 0..10 {
        if !buf.has_remaining() {
            return Err(WireError::Truncated);
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(WireError::VarintTooLong)
}

fn put_bytes_field(buf: &mut BytesMut, field: u32, data: &[u8]) {
    put_varint(buf, (u64::from(field) << 3) | 2);
    put_varint(buf, data.len() as u64);
    buf.put_slice(data);
}

/// Walks a message's fields, calling `f(field, value)`; skips fields `f` does not want.
fn for_each_field(
    mut buf: &[u8],
    mut f: impl FnMut(u32, Value<'_>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    while buf.has_remaining() {
        let key = get_varint(&mut buf)?;
        let field = u32::try_from(key >> 3).map_err(|_| WireError::Truncated)?;
        match key & 7 {
            0 => f(field, Value::Varint(get_varint(&mut buf)?))?,
            1 => {
                if buf.remaining() < 8 {
                    return Err(WireError::Truncated);
                }
                buf.advance(8);
            }
            2 => {
                let len =
                    usize::try_from(get_varint(&mut buf)?).map_err(|_| WireError::Truncated)?;
                if buf.remaining() < len {
                    return Err(WireError::Truncated);
                }
                let (data, rest) = buf.split_at(len);
                buf = rest;
                f(field, Value::Bytes(data))?;
            }
            5 => {
                if buf.remaining() < 4 {
                    return Err(WireError::Truncated);
                }
                buf.advance(4);
            }
            other => return Err(WireError::WireType(other)),
        }
    }
    Ok(())
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn utf8(field: u32, data: &[u8]) -> Result<String, WireError> {
    String::from_utf8(data.to_vec()).map_err(|_| WireError::Utf8(field))
}

impl CertificateRequest {
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.csr.len() + 16);
        put_bytes_field(&mut buf, 1, self.csr.as_bytes());
        if self.validity_duration != 0 {
            put_varint(&mut buf, 3 << 3);
            // int64 is encoded as its two's complement, as protobuf does.
            put_varint(&mut buf, self.validity_duration as u64);
        }
        buf.freeze()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut out = Self::default();
        for_each_field(buf, |field, value| {
            match (field, value) {
                (1, Value::Bytes(b)) => out.csr = utf8(1, b)?,
                (3, Value::Varint(v)) => out.validity_duration = v as i64,
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    }
}

impl CertificateResponse {
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::new();
        for cert in &self.cert_chain {
            put_bytes_field(&mut buf, 200, cert.as_bytes());
        }
        buf.freeze()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut out = Self::default();
        for_each_field(buf, |field, value| {
            if let (200, Value::Bytes(b)) = (field, value) {
                out.cert_chain.push(utf8(200, b)?);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// One gRPC length-prefixed message (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(message.len() + 5);
    buf.put_u8(0);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message);
    buf.freeze()
}

/// How many bytes the complete body of a unary call needs, once its 5-byte prefix is in:
/// `Ok(None)` while the prefix is incomplete.
pub fn framed_len(body: &[u8]) -> Result<Option<usize>, WireError> {
    if body.len() < 5 {
        return Ok(None);
    }
    if body[0] != 0 {
        return Err(WireError::Compressed(body[0]));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    Ok(Some(len + 5))
}

/// The message of a unary call's complete body (exactly one frame).
pub fn unframe(body: &[u8]) -> Result<&[u8], WireError> {
    let total = framed_len(body)?.ok_or(WireError::Truncated)?;
    if body.len() < total {
        return Err(WireError::Truncated);
    }
    if body.len() > total {
        return Err(WireError::Trailing(body.len() - total));
    }
    Ok(&body[5..total])
}

/// `grpc-message` is percent-encoded (grpc/doc/PROTOCOL-HTTP2.md): every byte outside
/// printable ASCII, and `%` itself.
pub fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_message`]; malformed escapes are kept as they are.
pub fn decode_message(msg: &str) -> String {
    let bytes = msg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let b = (hi * 16 + lo) as u8;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_matches_protobuf_bytes() {
        let req = CertificateRequest {
            csr: "PEM".into(),
            validity_duration: 3600,
        };
        let bytes = req.encode();
        // field 1 (0x0a) len 3 "PEM", field 3 varint (0x18) 3600 = 0x90 0x1c
        assert_eq!(&bytes[..], b"\x0a\x03PEM\x18\x90\x1c");
        assert_eq!(CertificateRequest::decode(&bytes), Ok(req));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // metadata (field 4, a Struct), a fixed64 (field 9) and a fixed32 (field 10) around csr.
        let mut buf = BytesMut::new();
        put_bytes_field(&mut buf, 4, b"\x0a\x02ab");
        buf.put_slice(&[(9 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        put_bytes_field(&mut buf, 1, b"CSR");
        buf.put_slice(&[(10 << 3) | 5, 1, 2, 3, 4]);
        let req = CertificateRequest::decode(&buf).expect("decodes");
        assert_eq!(req.csr, "CSR");
        assert_eq!(req.validity_duration, 0);
        assert_eq!(
            CertificateRequest::decode(b"\x0a\x05ab"),
            Err(WireError::Truncated)
        );
        assert_eq!(
            CertificateRequest::decode(b"\x0b"),
            Err(WireError::WireType(3))
        );
    }

    #[test]
    fn response_uses_field_200() {
        let resp = CertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        let bytes = resp.encode();
        assert_eq!(&bytes[..3], b"\xc2\x0c\x04");
        assert_eq!(CertificateResponse::decode(&bytes), Ok(resp));
    }

    #[test]
    fn framing() {
        let framed = frame(b"abc");
        assert_eq!(&framed[..], b"\x00\x00\x00\x00\x03abc");
        assert_eq!(framed_len(&framed[..4]), Ok(None));
        assert_eq!(framed_len(&framed), Ok(Some(8)));
        assert_eq!(unframe(&framed), Ok(&b"abc"[..]));
        assert_eq!(unframe(&framed[..6]), Err(WireError::Truncated));
        assert_eq!(
            unframe(&[&framed[..], b"x"].concat()),
            Err(WireError::Trailing(1))
        );
        assert_eq!(
            framed_len(b"\x01\x00\x00\x00\x00"),
            Err(WireError::Compressed(1))
        );
        assert_eq!(
            framed_len(b"\x00\x01\x00\x00\x00"),
            Err(WireError::TooLarge(1 << 24))
        );
    }

    #[test]
    fn grpc_message_percent_encoding() {
        let msg = "refused: 100% über";
        let enc = encode_message(msg);
        assert!(enc.is_ascii(), "{enc}");
        assert_eq!(decode_message(&enc), msg);
    }
}
