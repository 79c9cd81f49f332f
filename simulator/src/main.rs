//! `openai-simulator [--port N] [--host IP] [--script "500,500,ok"] [--default STEP] [--quiet]`
//!
//! Serves the fault-injecting OpenAI fake until SIGINT/SIGTERM. Port defaults to `$PORT` or 8089.
//! Prints `openai-simulator listening on http://127.0.0.1:PORT/v1` on stdout once ready and one
//! line per API request on stderr.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use openai_simulator::{Simulator, Step, parse_script};

const USAGE: &str = "usage: openai-simulator [--port N] [--host IP] [--script \"500,500,ok\"] [--default STEP] [--quiet]

Script steps (comma separated): ok | delay=<ms> | <status>[:ra=<s>][:ra-ms=<ms>][:ra-date=<s>]
[:retry=true|false][:quota][:delay=<ms>] | hang | reset | cut | stream-cut
| stream[:delay=<ms>][:gap=<ms>][:stall=<n>][:cut=<n>][:bytes=<n>[k|m]] (live chunked SSE) | big=<bytes>[k|m]
Control: PUT /_sim/script, PUT /_sim/default, GET|DELETE /_sim/requests, GET /_sim/health";

struct Args {
    port: u16,
    host: IpAddr,
    script: Vec<Step>,
    default: Option<Step>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: match std::env::var("PORT") {
            Ok(p) if !p.trim().is_empty() => p
                .trim()
                .parse()
                .map_err(|_| format!("invalid PORT `{p}`"))?,
            _ => 8089,
        },
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        script: Vec::new(),
        default: None,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--port" | "-p" => {
                let v = value("--port")?;
                args.port = v.parse().map_err(|_| format!("invalid port `{v}`"))?;
            }
            "--host" => {
                let v = value("--host")?;
                args.host = v.parse().map_err(|_| format!("invalid host `{v}`"))?;
            }
            "--script" | "-s" => args.script = parse_script(&value("--script")?)?,
            "--default" | "-d" => args.default = Some(value("--default")?.parse()?),
            "--quiet" | "-q" => args.quiet = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// Install the SIGINT/SIGTERM handlers now (before announcing readiness) and return a future
/// that completes when either arrives.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("openai-simulator: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let sim = match Simulator::start_on(SocketAddr::new(args.host, args.port)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "openai-simulator: cannot listen on {}:{}: {e}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    sim.set_log(!args.quiet);
    sim.set_script(args.script);
    if let Some(d) = args.default {
        sim.set_default(d);
    }
    let signal = match shutdown_signal() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("openai-simulator: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "openai-simulator listening on {}", sim.base_url());
    let _ = out.flush();
    drop(out);

    signal.await;
    eprintln!("openai-simulator: shutting down");
    sim.shutdown();
    ExitCode::SUCCESS
}
