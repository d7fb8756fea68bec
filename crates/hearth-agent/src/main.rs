//! hearth-agent binary. Three roles, chosen at start:
//! - with the hidden argument [`hearth_agent::EXEC_INIT_ARG`]: an exec-init ([`hearth_agent::exec_init`]);
//! - as PID 1: the guest's init and agent ([`hearth_agent::pid1`]);
//! - otherwise: the agent outside a VM ([`hearth_agent::standalone`]).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(hearth_agent::EXEC_INIT_ARG) {
        hearth_agent::exec_init::main();
    }
    if std::process::id() == 1 {
        hearth_agent::pid1::run();
    }
    let result =
        hearth_agent::standalone::parse_args(&args).and_then(hearth_agent::standalone::run);
    if let Err(e) = result {
        eprintln!("hearth-agent: {e}");
        std::process::exit(2);
    }
}
