//! The `imagegate` binary: parse the command line, then either run the gateway or one of the management
//! commands of `cli::commands`, printing what it returns. Only startup may fail loudly here; everything on the
//! request path returns errors.

use std::process::ExitCode;

use clap::Parser;
use imagegate::cli::{Cli, Command, ConfigCommand, ServeArgs, commands};
use imagegate::startup::Application;
use imagegate::{server, telemetry};

/// mimalloc instead of the system allocator: a request allocates and frees hundreds of small objects across
/// threads, and glibc's malloc/free were ~15 % of the gateway's instructions per request (callgrind,
/// docs/performance.md). The `system-allocator` feature (profiling only) leaves the system allocator in place
/// so that heap profilers hooking malloc see the gateway's allocations.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match cli.command {
        Command::Serve(args) => return serve(args).await,
        Command::Tenants(command) => commands::tenants(command).await,
        Command::Keys(command) => commands::keys(command).await,
        Command::Usage(args) => commands::usage(args).await,
        Command::Config(ConfigCommand::Check(args)) => commands::config_check(&args),
        Command::Pools(args) => commands::pools(args).await,
        Command::Models(args) => commands::models_list(&args),
    };
    match output {
        Ok(text) => {
            print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{e:#}")),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let traces = match telemetry::init_with_traces(&settings.log, &settings.tracing) {
        Ok(traces) => traces,
        Err(e) => return fail(&e),
    };
    tracing::debug!(settings = ?settings, "effective configuration");
    // Listening from here on: a signal during startup stops the gateway gracefully once it is up.
    let shutdown = server::shutdown::signal();
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => return fail(&e),
    };
    let result = app.run_until(shutdown).await;
    if let Some(traces) = traces {
        // The batch exporter's shutdown blocks until the last spans are sent: off the async workers.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn print(text: &str) {
    print!("{text}");
}

#[expect(clippy::print_stderr, reason = "startup failures go to stderr before or instead of logging")]
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("imagegate: {e}");
    ExitCode::FAILURE
}
