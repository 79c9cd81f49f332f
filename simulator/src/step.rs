//! Fault-script steps: the data type, the compact text form and the JSON form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What the simulator does with one API request. See the crate docs for the text and JSON forms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Answer 200 with a realistic body for the route (`ok`).
    #[default]
    Ok,
    /// Wait `ms` milliseconds, then answer like [`Step::Ok`] (`delay=<ms>` or `ok:delay=<ms>`).
    Delay { ms: u64 },
    /// Answer with an OpenAI-style error (`500`, `429:ra=2`, `429:quota`, ...).
    Error(ErrorStep),
    /// Read the request and never answer (`hang`).
    Hang,
    /// Read the request, then reset the connection (RST) before any response byte (`reset`).
    Reset,
    /// Send 200 headers announcing the full Content-Length, send only part of the body, close (`cut`).
    Cut,
    /// Streaming request: send the SSE headers and some events, then close (`stream-cut`).
    /// On a non-streaming request it behaves like [`Step::Cut`].
    StreamCut,
    /// Answer 200 like [`Step::Ok`], grown to at least `bytes` bytes (`big=<bytes>`): an
    /// embeddings answer gets more full-size embeddings, any other answer trailing newlines.
    Big { bytes: u64 },
    /// Streaming request: a live SSE stream, sent event by event with chunked transfer encoding,
    /// each event split across two TCP writes (`stream:gap=200:cut=3`). On a non-streaming
    /// request it behaves like [`Step::Ok`] (after `delay_ms`).
    Stream(StreamStep),
}

/// Parameters of a live stream ([`Step::Stream`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StreamStep {
    /// Wait this long before the response head (`delay=<ms>`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    /// Pause between events; half of it falls between the two writes of each event (`gap=<ms>`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gap_ms: u64,
    /// After this many events, send nothing more but keep the connection open (`stall=<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_after: Option<u64>,
    /// After this many events, close the connection without ending the body (`cut=<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_after: Option<u64>,
    /// Make the generated text at least this long, in bytes (`bytes=<n>`, `k`/`m` suffixes):
    /// a long stream for benchmarks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
}

/// Parameters of an error step ([`Step::Error`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorStep {
    /// HTTP status, 400..=599.
    pub status: u16,
    /// `retry-after: <secs>` header (`ra=<secs>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// `retry-after-ms: <ms>` header (`ra-ms=<ms>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// `retry-after: <IMF-fixdate>` this many seconds in the future (`ra-date=<secs>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_date_secs: Option<u64>,
    /// `x-should-retry: true|false` header (`retry=true|false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub should_retry: Option<bool>,
    /// 429 only: `insufficient_quota` instead of `rate_limit_exceeded` (`quota`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quota: bool,
    /// Wait this long before answering (`delay=<ms>`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Step {
    /// A plain error step with the given status and no modifiers.
    pub fn status(status: u16) -> Step {
        Step::Error(ErrorStep {
            status,
            ..ErrorStep::default()
        })
    }

    /// Check invariants that the type system does not enforce (status range, quota only on 429).
    pub fn validate(&self) -> Result<(), String> {
        if let Step::Error(e) = self {
            if !(400..=599).contains(&e.status) {
                return Err(format!(
                    "error status must be within 400..=599, got {}",
                    e.status
                ));
            }
            if e.quota && e.status != 429 {
                return Err("`quota` only applies to status 429".into());
            }
        }
        Ok(())
    }
}

/// `50m`, `64k` or a plain number of bytes.
fn parse_size(key: &str, v: &str) -> Result<u64, String> {
    let (num, unit) = match v.strip_suffix(['k', 'm']) {
        Some(n) if v.ends_with('k') => (n, 1024),
        Some(n) => (n, 1024 * 1024),
        None => (v, 1),
    };
    parse_num(key, num)?
        .checked_mul(unit)
        .ok_or_else(|| format!("`{key}` is too large"))
}

fn parse_stream(parts: impl Iterator<Item = String>) -> Result<Step, String> {
    let mut st = StreamStep::default();
    for m in parts.filter(|m| !m.is_empty()) {
        let (k, v) = m.split_once('=').unwrap_or((&m, ""));
        let (k, v) = (k.trim(), v.trim());
        match k {
            "delay" => st.delay_ms = parse_num(k, v)?,
            "gap" => st.gap_ms = parse_num(k, v)?,
            "stall" => st.stall_after = Some(parse_num(k, v)?),
            "cut" => st.cut_after = Some(parse_num(k, v)?),
            "bytes" => st.bytes = parse_size(k, v)?,
            _ => return Err(format!("unknown stream modifier `{k}`")),
        }
    }
    Ok(Step::Stream(st))
}

fn parse_num(key: &str, v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .map_err(|_| format!("`{key}` needs a non-negative integer, got `{v}`"))
}

impl FromStr for Step {
    type Err = String;

    fn from_str(s: &str) -> Result<Step, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower.is_empty() {
            return Err("empty step".into());
        }
        let mut parts = lower.split([':', '+']).map(str::trim);
        let head = parts.next().unwrap_or_default();
        if head == "stream" {
            return parse_stream(parts.map(str::to_owned));
        }
        let mut delay: Option<u64> = None;
        let mut err: Option<ErrorStep> = None;
        let base = match head {
            "ok" | "200" => Step::Ok,
            "hang" => Step::Hang,
            "reset" => Step::Reset,
            "cut" => Step::Cut,
            "stream-cut" | "stream_cut" | "streamcut" => Step::StreamCut,
            h if h.starts_with("big=") => Step::Big {
                bytes: parse_size("big", &h["big=".len()..])?,
            },
            h if h.starts_with("delay=") => {
                delay = Some(parse_num("delay", &h["delay=".len()..])?);
                Step::Ok
            }
            h if !h.is_empty() && h.bytes().all(|b| b.is_ascii_digit()) => {
                let status: u16 = h.parse().map_err(|_| format!("bad status `{h}`"))?;
                err = Some(ErrorStep {
                    status,
                    ..ErrorStep::default()
                });
                Step::Ok
            }
            other => return Err(format!("unknown step `{other}` in `{}`", s.trim())),
        };
        for m in parts {
            if m.is_empty() {
                continue;
            }
            let (k, v) = m.split_once('=').unwrap_or((m, ""));
            let (k, v) = (k.trim(), v.trim());
            if k == "delay" {
                match base {
                    Step::Ok => delay = Some(parse_num(k, v)?),
                    _ => return Err(format!("`delay` does not apply to `{head}`")),
                }
                continue;
            }
            let Some(e) = err.as_mut() else {
                return Err(format!(
                    "modifier `{k}` only applies to error statuses, not `{head}`"
                ));
            };
            match k {
                "ra" | "retry-after" => e.retry_after_secs = Some(parse_num(k, v)?),
                "ra-ms" | "retry-after-ms" => e.retry_after_ms = Some(parse_num(k, v)?),
                "ra-date" | "retry-after-date" => e.retry_after_date_secs = Some(parse_num(k, v)?),
                "retry" | "should-retry" | "x-should-retry" => {
                    e.should_retry = Some(match v {
                        "true" | "1" | "yes" | "" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(format!("`retry` needs true or false, got `{v}`")),
                    })
                }
                "quota" => {
                    e.quota = match v {
                        "" | "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(format!("`quota` takes no value or true/false, got `{v}`"));
                        }
                    }
                }
                _ => return Err(format!("unknown modifier `{k}`")),
            }
        }
        let step = match (err, delay) {
            (Some(mut e), d) => {
                e.delay_ms = d.unwrap_or(0);
                Step::Error(e)
            }
            (None, Some(ms)) if ms > 0 => Step::Delay { ms },
            (None, _) => base,
        };
        step.validate()?;
        Ok(step)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Ok => f.write_str("ok"),
            Step::Delay { ms } => write!(f, "delay={ms}"),
            Step::Hang => f.write_str("hang"),
            Step::Reset => f.write_str("reset"),
            Step::Cut => f.write_str("cut"),
            Step::StreamCut => f.write_str("stream-cut"),
            Step::Big { bytes } => write!(f, "big={bytes}"),
            Step::Stream(st) => {
                f.write_str("stream")?;
                for (k, v) in [
                    ("delay", Some(st.delay_ms).filter(|v| *v > 0)),
                    ("gap", Some(st.gap_ms).filter(|v| *v > 0)),
                    ("stall", st.stall_after),
                    ("cut", st.cut_after),
                    ("bytes", Some(st.bytes).filter(|v| *v > 0)),
                ] {
                    if let Some(v) = v {
                        write!(f, ":{k}={v}")?;
                    }
                }
                Ok(())
            }
            Step::Error(e) => {
                write!(f, "{}", e.status)?;
                if e.quota {
                    f.write_str(":quota")?;
                }
                if let Some(v) = e.retry_after_secs {
                    write!(f, ":ra={v}")?;
                }
                if let Some(v) = e.retry_after_ms {
                    write!(f, ":ra-ms={v}")?;
                }
                if let Some(v) = e.retry_after_date_secs {
                    write!(f, ":ra-date={v}")?;
                }
                if let Some(v) = e.should_retry {
                    write!(f, ":retry={v}")?;
                }
                if e.delay_ms > 0 {
                    write!(f, ":delay={}", e.delay_ms)?;
                }
                Ok(())
            }
        }
    }
}

/// Parse the compact comma-separated script form, e.g. `"500,500:ra=1,ok"`.
///
/// Whitespace around items is ignored and empty items are skipped, so `""` is an empty script.
pub fn parse_script(text: &str) -> Result<Vec<Step>, String> {
    text.split([',', '\n', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Step::from_str)
        .collect()
}

/// Parse a control-route body: compact text, a JSON string, a JSON step object, or a JSON
/// array whose items are step objects or compact-text strings.
pub(crate) fn parse_steps_body(body: &str) -> Result<Vec<Step>, String> {
    let t = body.trim();
    if t.starts_with('[') || t.starts_with('{') || t.starts_with('"') {
        let v: serde_json::Value =
            serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
        let items = match v {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                serde_json::Value::String(s) => out.extend(parse_script(&s)?),
                other => {
                    let step: Step = serde_json::from_value(other)
                        .map_err(|e| format!("invalid step object: {e}"))?;
                    step.validate()?;
                    out.push(step);
                }
            }
        }
        Ok(out)
    } else {
        parse_script(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_compact_forms() {
        let s = parse_script(
            "500, 500:ra=2 ,OK,delay=150,429:quota,hang,reset,cut,stream-cut,big=7500000",
        )
        .unwrap();
        assert_eq!(
            s,
            vec![
                Step::status(500),
                Step::Error(ErrorStep {
                    status: 500,
                    retry_after_secs: Some(2),
                    ..Default::default()
                }),
                Step::Ok,
                Step::Delay { ms: 150 },
                Step::Error(ErrorStep {
                    status: 429,
                    quota: true,
                    ..Default::default()
                }),
                Step::Hang,
                Step::Reset,
                Step::Cut,
                Step::StreamCut,
                Step::Big { bytes: 7_500_000 },
            ]
        );
        let e: Step = "503:ra-ms=250+ra-date=3:retry=false:delay=10"
            .parse()
            .unwrap();
        assert_eq!(
            e,
            Step::Error(ErrorStep {
                status: 503,
                retry_after_ms: Some(250),
                retry_after_date_secs: Some(3),
                should_retry: Some(false),
                delay_ms: 10,
                ..Default::default()
            })
        );
        assert_eq!(
            "ok:delay=20".parse::<Step>().unwrap(),
            Step::Delay { ms: 20 }
        );
        assert_eq!(parse_script("").unwrap(), vec![]);
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "nope",
            "700",
            "200:ra=1",
            "500:ra=x",
            "500:quota",
            "hang:delay=5",
            "big=",
            "big=1:delay=5",
            "500:zzz",
            "delay=",
        ] {
            assert!(bad.parse::<Step>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "ok",
            "delay=5",
            "500",
            "429:quota:ra=1:ra-ms=20:ra-date=3:retry=true:delay=7",
            "hang",
            "reset",
            "cut",
            "stream-cut",
            "big=7500000",
            "stream",
            "stream:delay=5:gap=200:stall=2",
            "stream:gap=10:cut=3:bytes=1024",
        ] {
            let step: Step = s.parse().unwrap();
            assert_eq!(step.to_string(), s);
        }
    }

    #[test]
    fn stream_steps() {
        assert_eq!(
            "stream:gap=250+cut=3".parse::<Step>().unwrap(),
            Step::Stream(StreamStep {
                gap_ms: 250,
                cut_after: Some(3),
                ..Default::default()
            })
        );
        assert_eq!(
            "STREAM:bytes=50m".parse::<Step>().unwrap(),
            Step::Stream(StreamStep {
                bytes: 50 * 1024 * 1024,
                ..Default::default()
            })
        );
        let Step::Stream(st) = "stream:bytes=64k".parse::<Step>().unwrap() else {
            panic!("not a stream step");
        };
        assert_eq!(st.bytes, 65_536);
        for bad in [
            "stream:gap=x",
            "stream:quota",
            "stream:bytes=99999999999999999m",
        ] {
            assert!(bad.parse::<Step>().is_err(), "{bad} should fail");
        }
        let json = r#"[{"kind":"stream","gap_ms":100,"stall_after":2},"stream:cut=1"]"#;
        let steps = parse_steps_body(json).unwrap();
        assert_eq!(
            steps[0],
            Step::Stream(StreamStep {
                gap_ms: 100,
                stall_after: Some(2),
                ..Default::default()
            })
        );
        assert_eq!(
            serde_json::to_string(&steps[1]).unwrap(),
            r#"{"kind":"stream","cut_after":1}"#
        );
    }

    #[test]
    fn json_forms() {
        let steps = parse_steps_body(
            r#"[{"kind":"error","status":429,"retry_after_secs":1},"500,ok",{"kind":"delay","ms":5},{"kind":"stream_cut"},{"kind":"big","bytes":100}]"#,
        )
        .unwrap();
        assert_eq!(steps.len(), 6);
        assert_eq!(steps[5], Step::Big { bytes: 100 });
        assert_eq!(
            serde_json::to_string(&steps[5]).unwrap(),
            r#"{"kind":"big","bytes":100}"#
        );
        assert_eq!(
            serde_json::to_string(&steps[0]).unwrap(),
            r#"{"kind":"error","status":429,"retry_after_secs":1}"#
        );
        assert_eq!(
            serde_json::to_string(&Step::Ok).unwrap(),
            r#"{"kind":"ok"}"#
        );
        assert_eq!(steps[4], Step::StreamCut);
        assert!(parse_steps_body(r#"{"kind":"error","status":200}"#).is_err());
        assert_eq!(
            parse_steps_body("\"503\"").unwrap(),
            vec![Step::status(503)]
        );
    }
}
