//! The agent's HTTP endpoints.
//!
//! - **Stats** ([`serve_stats`], port 15020 on the node's address unless `--metrics-addr` says
//!   otherwise): `/metrics` (also
//!   `/stats/prometheus`, as ztunnel) in Prometheus text, or OpenMetrics when `Accept` asks for
//!   `application/openmetrics-text`; `/healthz` (200 while the process runs); `/readyz` (also
//!   `/healthz/ready`): 503 listing the pending [`Readiness`] gates, 200 once none is left.
//! - **Admin** ([`serve_admin`], 127.0.0.1:15000, refused on any other address):
//!   `/config_dump` (JSON from a function the wiring provides), `/logging` (GET: the filter in
//!   force; POST `?level=<filter>`: replace it), `/quitquitquit` (POST: start shutdown).
//!
//! Both take an already bound listener and a shutdown future (tests bind port 0). The HTTP
//! limits are in [`http`].

pub mod http;
pub mod logging;

use std::{future::Future, net::SocketAddr, sync::Arc};

use ::http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use self::http::{Body, query_value, respond, text};
pub use self::logging::{LogFormat, LogHandle, LoggingError};
use crate::{
    metrics::{Format, SharedRegistry},
    readiness::Readiness,
};

pub const STATS_PORT: u16 = 15020;
pub const ADMIN_PORT: u16 = 15000;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin server must listen on a loopback address, not {0}: it can stop the agent")]
    NotLoopback(SocketAddr),
    #[error("cannot read the admin listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// What the stats server reads.
#[derive(Clone, Debug)]
pub struct StatsState {
    /// `Arc<MetricsRegistry>` converts into it (`.into()`).
    pub registry: SharedRegistry,
    pub readiness: Readiness,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` completes.
pub async fn serve_stats(
    listener: TcpListener,
    state: StatsState,
    shutdown: impl Future<Output = ()> + Send,
) {
    http::serve(listener, move |req| stats(&state, &req), shutdown, "stats").await;
}

fn stats(state: &StatsState, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            respond(
                StatusCode::OK,
                format.content_type(),
                state.registry.encode(format),
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" | "/healthz/ready" => {
            let pending = state.readiness.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Returns the whole configuration dump: config, workloads, services, policies, certificates
/// (identity, serial, expiry), map sizes; whatever the wiring has.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Starts the agent's shutdown (e.g. triggers the drain).
pub type Quit = Arc<dyn Fn() + Send + Sync>;

/// What the admin server acts on.
#[derive(Clone)]
pub struct AdminState {
    pub config_dump: ConfigDump,
    /// `None`: `/logging` answers 503 (no reloadable subscriber installed).
    pub logging: Option<LogHandle>,
    pub quit: Quit,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("logging", &self.logging)
            .finish_non_exhaustive()
    }
}

/// Serves the admin endpoints until `shutdown` completes. The listener must be on loopback.
pub async fn serve_admin(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AdminError> {
    let addr = listener.local_addr().map_err(AdminError::LocalAddr)?;
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    http::serve(listener, move |req| admin(&state, &req), shutdown, "admin").await;
    Ok(())
}

fn admin(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let (method, path) = (req.method(), req.uri().path());
    match (path, method) {
        ("/config_dump", &Method::GET) => {
            let dump = (state.config_dump)();
            match serde_json::to_vec_pretty(&dump) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        ("/logging", &Method::GET) => logging(state, None),
        ("/logging", &Method::POST) | ("/logging", &Method::PUT) => {
            match query_value(req.uri().query(), "level") {
                Some(level) => logging(state, Some(&level)),
                None => text(
                    StatusCode::BAD_REQUEST,
                    "expected ?level=<filter>, e.g. ?level=info,mesh_agent::tunnel=debug\n",
                ),
            }
        }
        ("/quitquitquit", &Method::POST) => {
            tracing::info!("shutdown requested through /quitquitquit");
            (state.quit)();
            text(StatusCode::OK, "shutting down\n")
        }
        ("/config_dump" | "/logging" | "/quitquitquit", _) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn logging(state: &AdminState, level: Option<&str>) -> Response<Body> {
    let Some(handle) = &state.logging else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no reloadable log filter installed\n",
        );
    };
    if let Some(level) = level {
        if let Err(e) = handle.set(level) {
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
        tracing::info!(filter = level, "log filter changed");
    }
    match handle.current() {
        Ok(f) => text(StatusCode::OK, format!("{f}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[cfg(test)]
pub(crate) mod tests;
