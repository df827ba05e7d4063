fn main() -> std::process::ExitCode {
    pexi_host::cli::main()
}
