//! Printer for the generic form, with MLIR's own layout (two spaces per nesting level, one
//! operation per line, regions as `({` … `}, {` … `})`), so that printing a module parsed from
//! MLIR's output reproduces it byte for byte.

use std::fmt::Write;

use super::ir::{AttrDict, Module, Op, Type};

/// Prints a module.
pub fn print_module(module: &Module) -> String {
    let mut out = String::with_capacity(1 << 16);
    for a in &module.leading {
        out.push_str(a);
        out.push('\n');
    }
    print_op(&mut out, &module.top, 0);
    out.push('\n');
    for a in &module.trailing {
        out.push_str(a);
        out.push('\n');
    }
    out
}

/// Prints one op (and its regions) on `out`, starting at indentation `indent`, without the
/// final newline.
pub fn print_op(out: &mut String, op: &Op, indent: usize) {
    pad(out, indent);
    if !op.results.is_empty() {
        for (i, g) in op.results.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&g.name);
            if g.count != 1 || g.explicit_count {
                let _ = write!(out, ":{}", g.count);
            }
        }
        out.push_str(" = ");
    }
    let _ = write!(out, "\"{}\"(", op.name);
    out.push_str(&op.operands.join(", "));
    out.push(')');
    if let Some(s) = &op.successors {
        out.push_str(s);
    }
    if let Some(p) = &op.properties {
        out.push_str(" <");
        print_dict(out, p);
        out.push('>');
    }
    if !op.regions.is_empty() {
        out.push_str(" (");
        for (ri, r) in op.regions.iter().enumerate() {
            if ri > 0 {
                out.push_str(", ");
            }
            out.push_str("{\n");
            for b in &r.blocks {
                if let Some(label) = &b.label {
                    pad(out, indent);
                    out.push_str(label);
                    if !b.args.is_empty() {
                        out.push('(');
                        for (i, a) in b.args.iter().enumerate() {
                            if i > 0 {
                                out.push_str(", ");
                            }
                            let _ = write!(out, "{}: {}", a.name, a.ty);
                            if let Some(l) = &a.loc {
                                out.push(' ');
                                out.push_str(l);
                            }
                        }
                        out.push(')');
                    }
                    out.push_str(":\n");
                }
                for o in &b.ops {
                    print_op(out, o, indent + 2);
                    out.push('\n');
                }
            }
            pad(out, indent);
            out.push('}');
        }
        out.push(')');
    }
    if let Some(a) = &op.attributes {
        out.push(' ');
        print_dict(out, a);
    }
    out.push_str(" : (");
    print_types(out, &op.operand_types);
    out.push_str(") -> ");
    if op.result_types.len() == 1 && !op.parenthesized_result {
        let _ = write!(out, "{}", op.result_types[0]);
    } else {
        out.push('(');
        print_types(out, &op.result_types);
        out.push(')');
    }
    if let Some(l) = &op.loc {
        out.push(' ');
        out.push_str(l);
    }
}

fn pad(out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(' ');
    }
}

fn print_types(out: &mut String, types: &[Type]) {
    for (i, t) in types.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{t}");
    }
}

/// Prints `{a = 1, b}`.
pub fn print_dict(out: &mut String, d: &AttrDict) {
    out.push('{');
    for (i, a) in d.entries.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&a.name);
        if let Some(v) = &a.value {
            out.push_str(" = ");
            out.push_str(v);
        }
    }
    out.push('}');
}
