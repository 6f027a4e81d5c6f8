//! The tracing subscriber: text or JSON lines, with a filter that `/logging` can replace at
//! runtime through a [`LogHandle`].

mod batch;

use std::{fmt, str::FromStr};

pub use batch::{ACCESS_TARGET, Batching, Sink, batch_access_lines, write_when_idle};

use tracing_subscriber::{
    EnvFilter, Registry, fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

impl FromStr for LogFormat {
    type Err = LoggingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(LoggingError::Format(other.to_string())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("unknown log format `{0}`: expected `text` or `json`")]
    Format(String),
    #[error(
        "invalid log filter `{filter}`: {source} (expected e.g. `info` or `info,mesh_agent::tunnel=debug`)"
    )]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("the logging subscriber is gone, the filter cannot change: {0}")]
    Reload(#[from] reload::Error),
    #[error("a global tracing subscriber is already installed: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// Changes the live filter.
#[derive(Clone, Debug)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Replaces the filter (`EnvFilter` syntax). An invalid filter changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), LoggingError> {
        let f = parse_filter(filter)?;
        self.0.reload(f)?;
        Ok(())
    }

    /// The filter in force, as text.
    pub fn current(&self) -> Result<String, LoggingError> {
        Ok(self.0.with_current(|f| f.to_string())?)
    }
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|source| LoggingError::Filter {
            filter: filter.to_string(),
            source,
        })
}

/// Builds (does not install) a subscriber writing to `writer`; text logs are coloured only when
/// `ansi` (a terminal), so files and log collectors get plain `key=value` lines.
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
    ansi: bool,
) -> Result<(impl tracing::Subscriber + Send + Sync + 'static, LogHandle), LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(parse_filter(filter)?);
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(writer),
            ),
        ),
    };
    let s = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    Ok((s, LogHandle(handle)))
}

/// Installs the process's subscriber on stderr; `filter` is the starting filter (e.g. from
/// `RUST_LOG`, default `info`). Threads that batch their access lines ([`batch_access_lines`]:
/// the tunnel shards) write them to stderr together, when they go idle ([`Batching`]).
pub fn init(format: LogFormat, filter: &str) -> Result<LogHandle, LoggingError> {
    use std::io::{IsTerminal, Write};
    let ansi = std::io::stderr().is_terminal();
    let sink: Sink = std::sync::Arc::new(|lines: &[u8]| {
        let _ = std::io::stderr().write_all(lines);
    });
    let (s, handle) = subscriber(format, filter, Batching::new(std::io::stderr, sink), ansi)?;
    s.try_init()?;
    Ok(handle)
}
