//! The rewrite as a pipeline of passes, each followed by [`verify`](super::verify): a pass that
//! leaves the module inconsistent is named in the error, not found out later by XLA.
//!
//! A run parses the module into a [`Context`] (and verifies the input), then runs its passes in
//! order. Passes share the context (the module, its location aliases, the report entries of
//! what they changed) and a state of the run's own: the `quantize` passes share the weights as
//! followed and their options ([`super::quantize`]); passes that need nothing more, such as
//! `update_slices_in_place`, work with any state.
//!
//! The `quantize` passes retype the weights first and rewrite their uses one kind at a time, so
//! between them some uses still declare the float type of an operand that is now FP8. Those
//! uses, and only those, are listed in [`Context::pending`]; each pass removes the uses it
//! rewrote, and verify accepts an FP8 value under its float type at a pending use only.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::ir::Module;
use super::verify::verify_pending;
use super::{aliases, parse_module, print_module, verify, RewriteError};

/// What the passes of one run share.
pub struct Context {
    /// The module being rewritten.
    pub module: Module,
    /// The module's location aliases (`#loc3` → `loc(...)`), for reports.
    pub aliases: HashMap<String, String>,
    /// Report entries of what the passes changed (`handled`), in the order they ran.
    pub handled: Vec<Value>,
    /// Uses (op id, operand index) of a retyped weight that a later pass still rewrites.
    pub pending: HashSet<(u32, usize)>,
}

impl Context {
    /// Parses the module and verifies it (errors of stage `parser`, `verify`).
    pub fn parse(module_text: &str) -> Result<Context, RewriteError> {
        let module = parse_module(module_text)?;
        verify(&module)?;
        Ok(Context {
            aliases: aliases(&module),
            module,
            handled: Vec::new(),
            pending: HashSet::new(),
        })
    }

    /// The module's text.
    pub fn print(&self) -> String {
        print_module(&self.module)
    }
}

/// One rewrite of the module. `S` is what the passes of a run share besides the [`Context`].
pub trait Pass<S> {
    /// The pass's name, as errors and the pass registry know it.
    fn name(&self) -> &'static str;
    /// Rewrites `cx.module`; errors are the pass's own refusals (bad input, `strict`).
    fn run(&self, cx: &mut Context, state: &mut S) -> Result<(), RewriteError>;
}

/// Runs `passes` in order, verifying the module after each.
pub fn run<S>(
    cx: &mut Context,
    state: &mut S,
    passes: &[&dyn Pass<S>],
) -> Result<(), RewriteError> {
    for pass in passes {
        pass.run(cx, state)?;
        check(cx, pass.name())?;
    }
    Ok(())
}

/// Verifies the module after the step `pass`; an inconsistency names that step.
pub fn check(cx: &Context, pass: &str) -> Result<(), RewriteError> {
    verify_pending(&cx.module, &cx.pending).map_err(|e| RewriteError {
        stage: "verify",
        expected: format!(
            "a consistently typed module after pass `{pass}`: {}",
            e.expected
        ),
        ..e
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::ir::{ElementType, Type};

    const MODULE: &str = r#""builtin.module"() <{sym_name = "m"}> ({
  "func.func"() <{function_type = (tensor<4x16xf32>, tensor<16x8xf32>) -> tensor<4x8xf32>, sym_name = "main", sym_visibility = "public"}> ({
  ^bb0(%arg0: tensor<4x16xf32>, %arg1: tensor<16x8xf32>):
    %0 = "stablehlo.dot_general"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>}> : (tensor<4x16xf32>, tensor<16x8xf32>) -> tensor<4x8xf32>
    "func.return"(%0) : (tensor<4x8xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"#;

    /// Renames nothing and changes nothing.
    struct Identity;
    impl Pass<()> for Identity {
        fn name(&self) -> &'static str {
            "identity"
        }
        fn run(&self, _: &mut Context, _: &mut ()) -> Result<(), RewriteError> {
            Ok(())
        }
    }

    /// A broken pass: retypes the dot's result and nothing that uses it.
    struct RetypeDotResult;
    impl Pass<()> for RetypeDotResult {
        fn name(&self) -> &'static str {
            "retype_dot_result"
        }
        fn run(&self, cx: &mut Context, _: &mut ()) -> Result<(), RewriteError> {
            cx.module.top.walk_mut(&mut |op| {
                if op.name == "stablehlo.dot_general" {
                    if let Type::Tensor(t) = &mut op.result_types[0] {
                        t.element = ElementType::Bf16;
                    }
                }
            });
            Ok(())
        }
    }

    #[test]
    fn a_pass_that_breaks_the_module_is_named() {
        let mut cx = Context::parse(MODULE).unwrap();
        run(&mut cx, &mut (), &[&Identity, &Identity]).expect("nothing broken");
        let e = run(&mut cx, &mut (), &[&Identity, &RetypeDotResult, &Identity]).unwrap_err();
        assert_eq!(e.stage, "verify");
        assert!(
            e.expected
                .starts_with("a consistently typed module after pass `retype_dot_result`: "),
            "{e}"
        );
        assert_eq!(e.found, "`tensor<4x8xf32>`", "{e}");
        assert_eq!(
            e.line, 5,
            "points at the func.return that reads the result: {e}"
        );
    }

    /// Retypes argument 1 to FP8 (as `quantize` retypes a weight) and nothing else.
    struct RetypeArg;
    impl Pass<()> for RetypeArg {
        fn name(&self) -> &'static str {
            "retype_arg"
        }
        fn run(&self, cx: &mut Context, _: &mut ()) -> Result<(), RewriteError> {
            let text = cx
                .print()
                .replace(
                    "(tensor<4x16xf32>, tensor<16x8xf32>) -> tensor<4x8xf32>, sym",
                    "(tensor<4x16xf32>, tensor<16x8xf8E4M3FN>) -> tensor<4x8xf32>, sym",
                )
                .replace("%arg1: tensor<16x8xf32>", "%arg1: tensor<16x8xf8E4M3FN>");
            cx.module = parse_module(&text)?;
            Ok(())
        }
    }

    #[test]
    fn only_pending_uses_may_keep_the_float_type() {
        let mut cx = Context::parse(MODULE).unwrap();
        let e = run(&mut cx, &mut (), &[&RetypeArg]).unwrap_err();
        assert!(e.expected.contains("after pass `retype_arg`"), "{e}");
        assert!(e.found.contains("16x8xf32"), "{e}");
        // The dot's operand 1 declared pending: accepted, and only there.
        let mut cx = Context::parse(MODULE).unwrap();
        let mut dot = 0;
        cx.module.top.walk(&mut |op| {
            if op.name == "stablehlo.dot_general" {
                dot = op.id;
            }
        });
        cx.pending.insert((dot, 1));
        run(&mut cx, &mut (), &[&RetypeArg]).expect("pending use accepted");
        cx.pending = HashSet::from([(dot, 0)]);
        assert!(check(&cx, "x").is_err(), "another operand is not pending");
    }
}
