//! How a gpo process logs: `--log-format text` (the human default) or `json` (one object
//! per line for a log pipeline), both through `tracing`, filtered by `GPO_LOG`.
//!
//! Why it exists: a log line of a distributed run is only useful next to the run, the
//! membership generation and the step it happened in. Those change in different places
//! (registration, a new generation, a step assignment, and on tokio tasks that no span
//! follows), so the process keeps them in one [`context`] that the adapters update, and
//! the JSON formatter writes them into every event, next to the fields of the spans the
//! event is in.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The format of the log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing's human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with `run_id`, `generation` and `step`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}` (expected text or json)"
            )),
        }
    }
}

/// The run, generation and step this process is at, written into every JSON event.
pub mod context {
    use super::*;

    static RUN: Mutex<String> = Mutex::new(String::new());
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    static STEP: AtomicU64 = AtomicU64::new(0);

    /// The run this process serves.
    pub fn set_run(run_id: &str) {
        let mut r = RUN.lock().unwrap_or_else(|p| p.into_inner());
        r.clear();
        r.push_str(run_id);
    }
    /// The membership generation it is in.
    pub fn set_generation(g: u64) {
        GENERATION.store(g, Ordering::Relaxed);
    }
    /// The step it works on (or last committed).
    pub fn set_step(s: u64) {
        STEP.store(s, Ordering::Relaxed);
    }
    /// (run id, generation, step) now.
    pub fn get() -> (String, u64, u64) {
        (
            RUN.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            GENERATION.load(Ordering::Relaxed),
            STEP.load(Ordering::Relaxed),
        )
    }
}

/// Installs the global subscriber writing to stderr; `GPO_LOG` filters (default `default`).
/// A second call does nothing.
pub fn init(format: LogFormat, default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("GPO_LOG").unwrap_or_else(|_| default.into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b
            .with_ansi(colour(
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .try_init(),
        LogFormat::Json => b
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLine)
            .try_init(),
    };
}

/// Whether text logs are coloured: only on a terminal, and never when `NO_COLOR` is set to
/// anything non-empty (<https://no-color.org>), so pipes and files get no escape codes.
pub fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The JSON event format: `{"timestamp", "level", "target", "run_id", "generation",
/// "step", "fields": {"message", …}, "spans": [{"name", "fields": {…}}]}`.
pub struct JsonLine;

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        use serde_json::{Map, Value};
        let mut o = Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        o.insert("timestamp".into(), ts.into());
        let meta = event.metadata();
        o.insert("level".into(), meta.level().as_str().into());
        o.insert("target".into(), meta.target().into());
        let (run, generation, step) = context::get();
        o.insert("run_id".into(), run.into());
        o.insert("generation".into(), generation.into());
        o.insert("step".into(), step.into());
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        o.insert("fields".into(), Value::Object(fields));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut s = Map::new();
                    s.insert("name".into(), span.name().into());
                    let ext = span.extensions();
                    if let Some(f) = ext.get::<FormattedFields<N>>() {
                        // With JsonFields (as `init` sets) the span's fields are an object.
                        let v = serde_json::from_str::<Value>(f)
                            .unwrap_or_else(|_| Value::String(f.to_string()));
                        if !f.is_empty() {
                            s.insert("fields".into(), v);
                        }
                    }
                    Value::Object(s)
                })
                .collect();
            if !spans.is_empty() {
                o.insert("spans".into(), Value::Array(spans));
            }
        }
        writeln!(writer, "{}", Value::Object(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(!colour(false, None), "a pipe got colour");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR counts as unset"
        );
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_events_carry_the_run_the_generation_the_step_and_their_spans() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLine)
            .finish();
        context::set_run("run-abc");
        context::set_generation(3);
        context::set_step(17);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("session", worker = 2);
            let _g = span.enter();
            tracing::warn!(peer = "10.0.0.6:50052", "ring \"peer\" lost");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(v["run_id"], "run-abc");
        assert_eq!(v["generation"], 3);
        assert_eq!(v["step"], 17);
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["message"], "ring \"peer\" lost");
        assert_eq!(v["fields"]["peer"], "10.0.0.6:50052");
        assert_eq!(v["spans"][0]["name"], "session");
        assert_eq!(v["spans"][0]["fields"]["worker"], 2, "{out}");
        assert!(v["timestamp"].as_str().unwrap().starts_with("20"));
    }

    #[test]
    fn formats_parse_and_a_wrong_one_is_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("`yaml`"));
    }
}
