//! Debugging front end of the graph rewrite.
//!
//! ```text
//! fp8xla-rewrite PASS MODULE.mlir [OPTIONS.json [REPORT.json]]
//! fp8xla-rewrite roundtrip MODULE.mlir
//! ```
//!
//! PASS is one of `fp8xla::rewrite::PASSES` (`quantize`, `instrument`,
//! `update_slices_in_place`, `decode_dots`, `sampler_argmax`, `shard_calls`); without
//! OPTIONS.json the options are `{}`.
//! Prints the rewritten module on stdout and the report (or sites table) on stderr, or into
//! REPORT.json when given. Exit status 1 on a rewrite error (printed on stderr), 2 on bad usage.

use std::process::ExitCode;

use fp8xla::rewrite;

fn usage() -> ExitCode {
    eprintln!(
        "usage: fp8xla-rewrite PASS MODULE.mlir [OPTIONS.json [REPORT.json]]\n       \
         fp8xla-rewrite roundtrip MODULE.mlir\nPASS: {}",
        rewrite::PASSES.join(", ")
    );
    ExitCode::from(2)
}

fn read(path: &str) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("fp8xla-rewrite: cannot read {path}: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, module_path) = match args.as_slice() {
        [cmd, module, ..] => (cmd.as_str(), module.as_str()),
        _ => return usage(),
    };
    if cmd != "roundtrip" && !rewrite::PASSES.contains(&cmd) {
        eprintln!(
            "fp8xla-rewrite: unknown pass {cmd:?} (known: {}, and roundtrip)",
            rewrite::PASSES.join(", ")
        );
        return usage();
    }
    let module = match read(module_path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let result = match (cmd, args.get(2)) {
        ("roundtrip", None) => rewrite::parse_module(&module).map(|m| {
            let printed = rewrite::print_module(&m);
            let same = if printed == module {
                "identical"
            } else {
                "different"
            };
            (printed, format!("{{\"roundtrip\": \"{same}\"}}"))
        }),
        ("roundtrip", Some(_)) => return usage(),
        (pass, options_path) => {
            let options = match options_path.map(|p| read(p)).transpose() {
                Ok(o) => o.unwrap_or_else(|| "{}".to_string()),
                Err(code) => return code,
            };
            rewrite::run_pass(pass, &module, &options)
        }
    };
    match result {
        Ok((text, report)) => {
            print!("{text}");
            match args.get(3) {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, report + "\n") {
                        eprintln!("fp8xla-rewrite: cannot write {path}: {e}");
                        return ExitCode::from(2);
                    }
                }
                None => eprintln!("{report}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
