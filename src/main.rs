//! CLI dispatch and telemetry; no logic.

use buildshuttle::config::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Both ring and aws-lc-rs are in the dependency tree (kube, aws-sdk, reqwest), so rustls
    // cannot pick a process-wide provider by itself and panics on the first TLS client
    // (kube's `Client::try_from`). Choose one before anything builds a client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    limit_malloc_arenas();
    no_kill_at_the_file_size_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the setting (clap's value names are the env var names).
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("buildshuttle: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Worker(args) => {
            // Build output is the pod log (stdout); only warnings from the service itself.
            init_tracing(&std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail_start(&e),
            };
            let outcome = rt.block_on(buildshuttle::worker::run(*args));
            if outcome.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Crd => match buildshuttle::operator::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("buildshuttle: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            init_tracing(&args.build.log_filter());
            // Before the config: the HTTP connection limit is sized from it.
            let files = buildshuttle::http_server::raise_open_file_limit();
            tracing::debug!(open_file_limit = ?files, "RLIMIT_NOFILE");
            let cfg = match args.validate() {
                Ok(c) => c,
                Err(e) => return fail_start(&e),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail_start(&e),
            };
            rt.block_on(async {
                let started = match buildshuttle::serve::start(cfg).await {
                    Ok(s) => s,
                    Err(e) => return fail_start(&e),
                };
                match buildshuttle::serve::serve(started).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("buildshuttle: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// glibc gives threads that allocate at the same time arenas of their own (up to 8 per core)
/// and keeps what they freed there. Under a `POST /` burst that slack was ~17 MiB of peak RSS
/// (66 → 55 MiB with two arenas, same rate; benches/post_rate.sh). MALLOC_ARENA_MAX, when
/// set, still decides.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// A write past the file size limit (`ulimit -f`, RLIMIT_FSIZE) fails with EFBIG, as a full
/// disk's does with ENOSPC, instead of killing the process and every build in it.
fn no_kill_at_the_file_size_limit() {
    // SAFETY: sets one signal's disposition to "ignore"; no handler runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn fail_start(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("buildshuttle: {e}");
    ExitCode::from(2)
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
