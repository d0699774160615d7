//! The `imagegate` binary: parse the command line, load settings, start logging, run. Only startup may fail
//! loudly here; everything on the request path returns errors.

use std::process::ExitCode;

use clap::Parser;
use imagegate::cli::{Cli, Command, ConfigCommand, KeysCommand};
use imagegate::config::Settings;
use imagegate::startup::Application;
use imagegate::{server, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let settings = match args.settings() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            telemetry::init(&settings.log);
            tracing::debug!(settings = ?settings, "effective configuration");
            let app = match Application::build(settings).await {
                Ok(app) => app,
                Err(e) => return fail(&e),
            };
            match app.run_until(server::shutdown::signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Keys(KeysCommand::New { tenant }) => {
            print(&imagegate::cli::new_key_text(&tenant));
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check(args)) => match Settings::load(&args.sources()) {
            Ok(settings) => {
                print(&format!("configuration is valid:\n{settings:#?}\n"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
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
