//! What the inbound side reads from a CONNECT request's headers: the `:authority` (must be
//! `ip:port`), `forwarded` (`for=` the client pod, `host=` the service it asked for), and the
//! `baggage` and `traceparent` it copies into the access log. Checks, besides "no panic":
//! `for=` round-trips through the form the outbound side writes, and the access line carrying
//! the peer's strings stays one line in both log formats, with the strings intact in JSON (a
//! peer cannot forge log lines or fields).
#![no_main]

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    admin::{LogFormat, logging},
    identity::SpiffeId,
    tunnel::{access, forwarded_for, metrics::forwarded_host, parse_forwarded_for},
};
use tracing::Dispatch;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    authority: &'a str,
    forwarded: &'a str,
    baggage: Option<&'a str>,
    traceparent: Option<&'a str>,
}

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

impl Buffer {
    fn take(&self) -> String {
        let bytes = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        String::from_utf8(bytes).expect("log output is UTF-8")
    }
}

/// The agent's own subscriber in `format`, writing to a buffer (built once: it is not cheap).
fn logger(format: LogFormat) -> &'static (Dispatch, Buffer) {
    static TEXT: OnceLock<(Dispatch, Buffer)> = OnceLock::new();
    static JSON: OnceLock<(Dispatch, Buffer)> = OnceLock::new();
    let cell = match format {
        LogFormat::Text => &TEXT,
        LogFormat::Json => &JSON,
    };
    cell.get_or_init(|| {
        let buf = Buffer::default();
        let b = buf.clone();
        let (subscriber, handle) = logging::subscriber(format, "info", move || b.clone(), false)
            .expect("the agent's subscriber");
        std::mem::forget(handle);
        (Dispatch::new(subscriber), buf)
    })
}

fuzz_target!(|input: Input<'_>| {
    // The authority, as the inbound side reads it.
    let dst = input.authority.parse::<SocketAddr>().ok();

    if let Some(for_addr) = parse_forwarded_for(input.forwarded) {
        assert_eq!(
            parse_forwarded_for(&forwarded_for(for_addr, None)),
            Some(for_addr)
        );
    }
    if let Some(host) = forwarded_host(input.forwarded) {
        assert!(!host.is_empty() && !host.contains(';'), "host={host:?}");
    }

    let src_identity: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .expect("id");
    let dst_identity: SpiffeId = "spiffe://cluster.local/ns/default/sa/server"
        .parse()
        .expect("id");
    let dst_text = dst.map(|d| d.to_string());
    let line = access::Inbound {
        src: "10.0.0.1:40000".parse().expect("addr"),
        forwarded: parse_forwarded_for(input.forwarded),
        src_identity: &src_identity,
        // Unparsable authorities are logged as sent.
        dst: Some(dst_text.as_deref().unwrap_or(input.authority)),
        dst_identity: &dst_identity,
        status: 400,
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: 1,
        traceparent: input.traceparent,
        baggage: input.baggage,
        result: "fuzz",
    };
    for format in [LogFormat::Text, LogFormat::Json] {
        let (dispatch, buf) = logger(format);
        tracing::dispatcher::with_default(dispatch, || access::inbound(&line));
        let out = buf.take();
        assert_eq!(out.lines().count(), 1, "one access line: {out:?}");
        assert!(
            out.ends_with('\n') && !out[..out.len() - 1].contains(['\n', '\r']),
            "{out:?}"
        );
        if let LogFormat::Json = format {
            let v: serde_json::Value = serde_json::from_str(&out).expect("a JSON line");
            let fields = &v["fields"];
            assert_eq!(
                fields["dst"],
                dst_text.as_deref().unwrap_or(input.authority)
            );
            for (key, value) in [
                ("baggage", input.baggage),
                ("traceparent", input.traceparent),
            ] {
                match value {
                    Some(s) => assert_eq!(fields[key], s, "{key}"),
                    None => assert!(fields.get(key).is_none(), "{key} absent"),
                }
            }
        }
    }
});
