//! StableHLO graph rewrite: parser, printer and passes.

pub mod ir;
pub mod parse;
pub mod print;

use std::fmt;

pub use ir::Pos;
pub use parse::parse_module;
pub use print::print_module;

/// An error of the parser, a pass or its options: where, what was expected, what came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewriteError {
    /// `parser`, `options`, `quantize`, `instrument` or `verify`.
    pub stage: &'static str,
    /// 1-based line in the module text (0 when the error is not about a place in the module).
    pub line: usize,
    /// 1-based column (0 when not about a place).
    pub column: usize,
    /// What was expected.
    pub expected: String,
    /// What came instead.
    pub found: String,
}

impl RewriteError {
    /// An error at `pos`.
    pub fn new(stage: &'static str, pos: Pos, expected: &str, found: &str) -> RewriteError {
        RewriteError {
            stage,
            line: pos.line,
            column: pos.column,
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}: {}:{}: expected {} but found {}",
                self.stage, self.line, self.column, self.expected, self.found
            )
        } else {
            write!(
                f,
                "{}: expected {} but found {}",
                self.stage, self.expected, self.found
            )
        }
    }
}

impl std::error::Error for RewriteError {}
