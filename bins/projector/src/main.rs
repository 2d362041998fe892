use std::process::ExitCode;

fn main() -> ExitCode {
    ordo_projector::cli::main_with(Vec::new())
}
