//! The inbound HBONE server after TLS: the bytes a peer sends inside the TLS session go into the
//! agent's real HTTP/2 server and CONNECT handling (`Inbound::serve_after_tls`) over an
//! in-memory duplex. The input is a sequence of HTTP/2 frames, most of them well formed (so
//! the fuzzer reaches the CONNECT checks instead of dying in the preface), some raw.
//!
//! The authorizer denies every CONNECT that passes the checks: the allowed path would dial the
//! authority for real (the tunnel's integration tests cover it). Time is tokio's paused clock,
//! so the server's timeouts (first request, idle) fire at once instead of hanging the run.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, OnceLock},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    identity::{
        CertCache, CertificateProvider, IdentityError, SpiffeId, TrustBundle, WorkloadCert,
    },
    tunnel::{
        Authorizer, AuthzDecision, AuthzRequest, LocalWorkload, StaticWorkloads, TunnelConfig,
        drain, inbound::Inbound,
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const WORKLOAD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER_WORKLOAD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

#[derive(Arbitrary, Debug)]
struct Input {
    /// Which address the connection arrived at: a workload's, or the node's.
    at_node: bool,
    /// Leave out the client preface (a peer speaking something else).
    no_preface: bool,
    frames: Vec<Frame>,
}

#[derive(Arbitrary, Debug)]
enum Method {
    Connect,
    Get,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Authority {
    /// The workload the connection arrived at, on a port.
    Workload(u16),
    /// Another local workload.
    Other(u16),
    Raw(String),
    Missing,
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Request {
        stream: u8,
        method: Method,
        authority: Authority,
        /// `:scheme` and `:path` (CONNECT must not have them).
        with_path: bool,
        /// `forwarded`, `baggage`, `traceparent`, or any name.
        headers: Vec<(HeaderName, String)>,
        end_stream: bool,
        /// Split the header block into HEADERS + CONTINUATION at this byte.
        split: Option<u8>,
    },
    Data {
        stream: u8,
        data: Vec<u8>,
        end_stream: bool,
    },
    Reset {
        stream: u8,
        code: u32,
    },
    Settings {
        ack: bool,
        values: Vec<(u16, u32)>,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    WindowUpdate {
        stream: u8,
        increment: u32,
    },
    GoAway {
        last: u8,
        code: u32,
    },
    Priority {
        stream: u8,
        depends_on: u8,
        weight: u8,
    },
    /// Any frame header and payload.
    Raw {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
    /// Bytes with no framing at all.
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum HeaderName {
    Forwarded,
    Baggage,
    Traceparent,
    Other(String),
}

fn stream_id(s: u8) -> u32 {
    u32::from(s) * 2 + 1
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len().min(0xff_ffff);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name (RFC 7541 §6.2.2), no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn encode(input: &Input, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    if !input.no_preface {
        out.extend_from_slice(PREFACE);
        frame(&mut out, 0x4, 0, 0, &[]);
    }
    for f in &input.frames {
        match f {
            Frame::Request {
                stream,
                method,
                authority,
                with_path,
                headers,
                end_stream,
                split,
            } => {
                let mut block = Vec::new();
                let method = match method {
                    Method::Connect => "CONNECT",
                    Method::Get => "GET",
                    Method::Other(m) => m,
                };
                hpack_literal(&mut block, b":method", method.as_bytes());
                let authority = match authority {
                    Authority::Workload(p) => Some(SocketAddr::new(local.ip(), *p).to_string()),
                    Authority::Other(p) => {
                        Some(SocketAddr::new(OTHER_WORKLOAD.into(), *p).to_string())
                    }
                    Authority::Raw(a) => Some(a.clone()),
                    Authority::Missing => None,
                };
                if let Some(a) = authority {
                    hpack_literal(&mut block, b":authority", a.as_bytes());
                }
                if *with_path {
                    hpack_literal(&mut block, b":scheme", b"https");
                    hpack_literal(&mut block, b":path", b"/");
                }
                for (name, value) in headers {
                    let name = match name {
                        HeaderName::Forwarded => "forwarded",
                        HeaderName::Baggage => "baggage",
                        HeaderName::Traceparent => "traceparent",
                        HeaderName::Other(n) => n,
                    };
                    hpack_literal(&mut block, name.as_bytes(), value.as_bytes());
                }
                let id = stream_id(*stream);
                let end = if *end_stream { 0x1 } else { 0 };
                match split.map(|s| usize::from(s).min(block.len())) {
                    Some(at) => {
                        frame(&mut out, 0x1, end, id, &block[..at]);
                        frame(&mut out, 0x9, 0x4, id, &block[at..]);
                    }
                    None => frame(&mut out, 0x1, end | 0x4, id, &block),
                }
            }
            Frame::Data {
                stream,
                data,
                end_stream,
            } => frame(
                &mut out,
                0x0,
                u8::from(*end_stream),
                stream_id(*stream),
                data,
            ),
            Frame::Reset { stream, code } => {
                frame(&mut out, 0x3, 0, stream_id(*stream), &code.to_be_bytes())
            }
            Frame::Settings { ack, values } => {
                let payload: Vec<u8> = values
                    .iter()
                    .flat_map(|(k, v)| k.to_be_bytes().into_iter().chain(v.to_be_bytes()))
                    .collect();
                frame(&mut out, 0x4, u8::from(*ack), 0, &payload)
            }
            Frame::Ping { ack, payload } => frame(&mut out, 0x6, u8::from(*ack), 0, payload),
            Frame::WindowUpdate { stream, increment } => {
                let id = if *stream == 0 { 0 } else { stream_id(*stream) };
                frame(&mut out, 0x8, 0, id, &increment.to_be_bytes())
            }
            Frame::GoAway { last, code } => {
                let mut p = stream_id(*last).to_be_bytes().to_vec();
                p.extend_from_slice(&code.to_be_bytes());
                frame(&mut out, 0x7, 0, 0, &p)
            }
            Frame::Priority {
                stream,
                depends_on,
                weight,
            } => {
                let mut p = stream_id(*depends_on).to_be_bytes().to_vec();
                p.push(*weight);
                frame(&mut out, 0x2, 0, stream_id(*stream), &p)
            }
            Frame::Raw {
                kind,
                flags,
                stream,
                payload,
            } => frame(&mut out, *kind, *flags, *stream, payload),
            Frame::Bytes(b) => out.extend_from_slice(b),
        }
    }
    out
}

/// Issues nothing: after TLS the server never asks for a certificate.
struct NoCerts;

impl CertificateProvider for NoCerts {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        Err(IdentityError::Provider {
            identity: identity.to_string(),
            reason: "the fuzz target issues no certificates".into(),
        })
    }

    fn trust_bundle(&self) -> TrustBundle {
        TrustBundle::new("cluster.local", Vec::new())
    }
}

struct DenyAll;

impl Authorizer for DenyAll {
    fn authorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        AuthzDecision::Deny {
            reason: format!("fuzz: {} is never dialled", req.destination),
        }
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().expect("a valid SPIFFE ID")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|input: Input| {
    let local = SocketAddr::new(
        IpAddr::V4(if input.at_node { NODE_ADDR } else { WORKLOAD }),
        mesh_common::INBOUND_HBONE_PORT,
    );
    let bytes = encode(&input, local);
    let workloads = StaticWorkloads::default()
        .with(LocalWorkload {
            name: "server".into(),
            namespace: "default".into(),
            identity: id("spiffe://cluster.local/ns/default/sa/server"),
            ip: WORKLOAD.into(),
        })
        .with(LocalWorkload {
            name: "other".into(),
            namespace: "other".into(),
            identity: id("spiffe://cluster.local/ns/other/sa/other"),
            ip: OTHER_WORKLOAD.into(),
        });
    let config = TunnelConfig {
        node_identity: Some(id("spiffe://cluster.local/ns/nodemesh-system/sa/node")),
        ..TunnelConfig::default()
    };
    let inbound = Inbound::new(
        config,
        Arc::new(CertCache::new(Arc::new(NoCerts))),
        Arc::new(workloads),
        Arc::new(DenyAll),
    );
    let (_trigger, watch) = drain::channel();
    let peer: SocketAddr = "127.0.0.3:40000".parse().expect("addr");
    let source = id("spiffe://cluster.local/ns/default/sa/client");
    runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut rx, mut tx) = tokio::io::split(client);
        let write = async move {
            let _ = tx.write_all(&bytes).await;
            let _ = tx.shutdown().await;
            // Keep the write half open until the server is done (a peer that stops sending
            // but still reads).
            tx
        };
        let read = async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let serve = async move {
            let r = inbound
                .clone()
                .serve_after_tls(server, peer, local, source, &watch)
                .await;
            assert_eq!(
                inbound.active_streams(),
                0,
                "every stream ended with its connection"
            );
            r
        };
        let (_tx, (), _result) = tokio::join!(write, read, serve);
    });
});
