//! The access log: one `info` event per tunneled connection, target `access` (outbound: per app
//! connection; inbound: per CONNECT stream). Values are plain (addresses as `ip:port`, identities
//! as SPIFFE URIs, strings as strings); a field with no value is left out of the line, in the text
//! format as in JSON, never written as `None` or `-`.

use std::net::SocketAddr;

use tracing::info;

use crate::{admin::logging::ACCESS_TARGET, identity::SpiffeId};

/// One outbound connection: an app connection the datapath redirected to the tunnel.
pub struct Outbound<'a> {
    /// The app's address (the redirected socket's peer).
    pub src: SocketAddr,
    pub src_identity: &'a SpiffeId,
    /// The address the app dialled (a pod or a service).
    pub dst: SocketAddr,
    /// The endpoint chosen, when one was.
    pub endpoint: Option<SocketAddr>,
    /// The identity the endpoint proved (or was expected to), when known.
    pub dst_identity: Option<&'a str>,
    /// The peer node's tunnel address, when the connection went through HBONE.
    pub hbone: Option<SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub result: &'a str,
}

/// One inbound CONNECT stream.
pub struct Inbound<'a> {
    /// The peer node's (or client's) address of the TLS connection.
    pub src: SocketAddr,
    /// The client pod's address from the `forwarded: for=` header, when sent.
    pub forwarded: Option<SocketAddr>,
    pub src_identity: &'a SpiffeId,
    /// The CONNECT authority, when there is one.
    pub dst: Option<&'a str>,
    pub dst_identity: &'a SpiffeId,
    /// The HTTP status answered.
    pub status: u16,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub traceparent: Option<&'a str>,
    pub baggage: Option<&'a str>,
    pub result: &'a str,
}

/// Writes the access line of an outbound connection.
pub fn outbound(r: &Outbound<'_>) {
    info!(target: ACCESS_TARGET, direction = "outbound", src = %r.src,
        src_identity = %r.src_identity, dst = %r.dst, endpoint = r.endpoint.map(display),
        dst_identity = r.dst_identity, hbone = r.hbone.map(display),
        bytes_sent = r.bytes_sent, bytes_received = r.bytes_received,
        duration_ms = r.duration_ms, result = r.result, "connection");
}

/// Writes the access line of an inbound stream.
pub fn inbound(r: &Inbound<'_>) {
    info!(target: ACCESS_TARGET, direction = "inbound", src = %r.src,
        forwarded = r.forwarded.map(display), src_identity = %r.src_identity, dst = r.dst,
        dst_identity = %r.dst_identity, status = r.status, bytes_sent = r.bytes_sent,
        bytes_received = r.bytes_received, duration_ms = r.duration_ms,
        traceparent = r.traceparent, baggage = r.baggage, result = r.result, "connection");
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::admin::{LogFormat, logging};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The one line `emit` writes through the agent's own subscriber in `format`.
    fn line(format: LogFormat, emit: impl FnOnce()) -> String {
        let buf = Buffer::default();
        let b = buf.clone();
        let (subscriber, _handle) =
            logging::subscriber(format, "info", move || b.clone(), false).expect("subscriber");
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one access line: {text}");
        lines[0].to_string()
    }

    /// The text line after the timestamp and level (`access: connection key=value ...`).
    fn fields(line: &str) -> &str {
        let at = line.find("access: ").expect("target `access`");
        &line[at..]
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("SPIFFE ID")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn json(line: &str) -> serde_json::Map<String, serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(v["target"], "access", "{line}");
        assert_eq!(v["level"], "INFO", "{line}");
        v["fields"].as_object().expect("fields").clone()
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
    const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

    fn outbound_full<'a>(src_identity: &'a SpiffeId) -> Outbound<'a> {
        Outbound {
            src: addr("10.77.0.1:40000"),
            src_identity,
            dst: addr("10.96.0.10:80"),
            endpoint: Some(addr("10.77.1.2:8080")),
            dst_identity: Some(SERVER),
            hbone: Some(addr("10.0.2.2:15008")),
            bytes_sent: 12,
            bytes_received: 34,
            duration_ms: 5,
            result: "ok",
        }
    }

    fn outbound_bare<'a>(src_identity: &'a SpiffeId) -> Outbound<'a> {
        Outbound {
            endpoint: None,
            dst_identity: None,
            hbone: None,
            bytes_sent: 0,
            bytes_received: 0,
            result: "refused: 10.96.0.10:80 is neither a known workload nor a service",
            ..outbound_full(src_identity)
        }
    }

    #[test]
    fn outbound_text_is_plain_and_omits_absent_fields() {
        let src = id(CLIENT);
        let l = line(LogFormat::Text, || outbound(&outbound_full(&src)));
        assert_eq!(
            fields(&l),
            format!(
                "access: connection direction=\"outbound\" src=10.77.0.1:40000 \
                 src_identity={CLIENT} dst=10.96.0.10:80 endpoint=10.77.1.2:8080 \
                 dst_identity=\"{SERVER}\" hbone=10.0.2.2:15008 bytes_sent=12 \
                 bytes_received=34 duration_ms=5 result=\"ok\""
            )
        );
        let l = line(LogFormat::Text, || outbound(&outbound_bare(&src)));
        assert_eq!(
            fields(&l),
            format!(
                "access: connection direction=\"outbound\" src=10.77.0.1:40000 \
                 src_identity={CLIENT} dst=10.96.0.10:80 bytes_sent=0 bytes_received=0 \
                 duration_ms=5 result=\"refused: 10.96.0.10:80 is neither a known workload nor a service\""
            )
        );
        assert!(!l.contains("None") && !l.contains("Some("), "{l}");
    }

    #[test]
    fn outbound_json_is_plain_and_omits_absent_fields() {
        let src = id(CLIENT);
        let f = json(&line(LogFormat::Json, || outbound(&outbound_full(&src))));
        let expected = serde_json::json!({
            "message": "connection", "direction": "outbound", "src": "10.77.0.1:40000",
            "src_identity": CLIENT, "dst": "10.96.0.10:80", "endpoint": "10.77.1.2:8080",
            "dst_identity": SERVER, "hbone": "10.0.2.2:15008", "bytes_sent": 12,
            "bytes_received": 34, "duration_ms": 5, "result": "ok",
        });
        assert_eq!(serde_json::Value::Object(f), expected);
        let f = json(&line(LogFormat::Json, || outbound(&outbound_bare(&src))));
        for absent in ["endpoint", "dst_identity", "hbone"] {
            assert!(!f.contains_key(absent), "{absent} absent: {f:?}");
        }
        assert_eq!(f["src"], "10.77.0.1:40000");
        assert_eq!(f["bytes_sent"], 0);
    }

    #[test]
    fn inbound_text_and_json_are_plain_and_omit_absent_fields() {
        let (client, server) = (id(CLIENT), id(SERVER));
        let full = Inbound {
            src: addr("10.0.2.1:51000"),
            forwarded: Some(addr("10.77.0.1:40000")),
            src_identity: &client,
            dst: Some("10.77.1.2:8080"),
            dst_identity: &server,
            status: 200,
            bytes_sent: 34,
            bytes_received: 12,
            duration_ms: 7,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
            baggage: Some("k8s.namespace.name=default,k8s.deployment.name=client"),
            result: "ok",
        };
        let l = line(LogFormat::Text, || inbound(&full));
        assert_eq!(
            fields(&l),
            format!(
                "access: connection direction=\"inbound\" src=10.0.2.1:51000 \
                 forwarded=10.77.0.1:40000 src_identity={CLIENT} dst=\"10.77.1.2:8080\" \
                 dst_identity={SERVER} status=200 bytes_sent=34 bytes_received=12 duration_ms=7 \
                 traceparent=\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\" \
                 baggage=\"k8s.namespace.name=default,k8s.deployment.name=client\" result=\"ok\""
            )
        );
        let bare = Inbound {
            forwarded: None,
            dst: None,
            status: 400,
            bytes_sent: 0,
            bytes_received: 0,
            traceparent: None,
            baggage: None,
            result: "method GET is not CONNECT",
            ..full
        };
        let l = line(LogFormat::Text, || inbound(&bare));
        assert_eq!(
            fields(&l),
            format!(
                "access: connection direction=\"inbound\" src=10.0.2.1:51000 \
                 src_identity={CLIENT} dst_identity={SERVER} status=400 bytes_sent=0 \
                 bytes_received=0 duration_ms=7 result=\"method GET is not CONNECT\""
            )
        );

        let f = json(&line(LogFormat::Json, || inbound(&full)));
        let expected = serde_json::json!({
            "message": "connection", "direction": "inbound", "src": "10.0.2.1:51000",
            "forwarded": "10.77.0.1:40000", "src_identity": CLIENT, "dst": "10.77.1.2:8080",
            "dst_identity": SERVER, "status": 200, "bytes_sent": 34, "bytes_received": 12,
            "duration_ms": 7,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            "baggage": "k8s.namespace.name=default,k8s.deployment.name=client", "result": "ok",
        });
        assert_eq!(serde_json::Value::Object(f), expected);
        let f = json(&line(LogFormat::Json, || inbound(&bare)));
        for absent in ["forwarded", "dst", "traceparent", "baggage"] {
            assert!(!f.contains_key(absent), "{absent} absent: {f:?}");
        }
        assert_eq!(f["status"], 400);
    }
}
