//! The `vmfork` command: parses arguments and hands them to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmfork",
    version,
    about = "Fork running KVM virtual machines by cloning guest memory as a file"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare the clone strategies side by side and print a table (and JSON).
    Bench {
        /// A smoke run: each suite's smallest size (64M; 256M for Linux), fewer forks.
        #[arg(long)]
        quick: bool,
        /// Write every measurement as JSON records to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Guest memory sizes to measure (repeatable), e.g. --size 1G --size 4G.
        #[arg(long = "size", value_parser = vmfork::units::parse_size)]
        sizes: Vec<usize>,
        /// Measure with 4 KiB pages only; by default guest memory asks for transparent
        /// huge pages (MADV_HUGEPAGE), and the table says what the kernel really gave.
        #[arg(long, conflicts_with = "huge_pages")]
        small_pages: bool,
        /// Ask for transparent huge pages: the default, accepted so that older scripts work.
        #[arg(long, hide = true)]
        huge_pages: bool,
        /// Run only these suites (repeatable; default: all).
        #[arg(long = "suite", value_enum)]
        suites: Vec<vmfork::bench::Suite>,
    },
    /// Print a saved `vmfork bench --json` report (table and ratios).
    Report {
        /// The JSON file written by `vmfork bench --json`.
        file: PathBuf,
        /// Also write the report as Markdown to FILE.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Also draw SVG charts (clone latency, first touch, fork memory) into DIR.
        #[arg(long, value_name = "DIR")]
        svg: Option<PathBuf>,
    },
    #[command(flatten)]
    Vm(vmfork::cli::VmCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { quick, json, sizes, small_pages, huge_pages: _, suites } => {
            let opts = vmfork::bench::BenchOptions { quick, sizes, huge_pages: !small_pages, json, suites };
            vmfork::cli::note_if_huge_pages_unavailable(&vmfork::memory::MemoryOptions {
                huge_pages: opts.huge_pages,
            });
            vmfork::bench::run(&opts).map(|_| ())
        }
        Command::Report { file, markdown, svg } => {
            vmfork::bench::render(&file, markdown.as_deref(), svg.as_deref())
        }
        Command::Vm(cmd) => return vmfork::cli::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmfork: {}", vmfork::error::Report(&e));
            ExitCode::FAILURE
        }
    }
}
