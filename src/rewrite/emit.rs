//! Building the ops the passes insert.

use std::collections::HashSet;

use super::attr::{array_i64, fmt_f32};
use super::ir::{Attr, AttrDict, Dim, ElementType, Module, Op, Pos, TensorType, Type};

/// Fresh SSA value names that collide with none in the module.
pub struct Names {
    used: HashSet<String>,
    next: usize,
}

impl Names {
    /// Collects the names in use in `module`.
    pub fn new(module: &Module) -> Names {
        let mut used = HashSet::new();
        module.top.walk(&mut |op| {
            for g in &op.results {
                used.insert(g.name.clone());
            }
            for r in &op.regions {
                for b in &r.blocks {
                    for a in &b.args {
                        used.insert(a.name.clone());
                    }
                }
            }
        });
        Names { used, next: 0 }
    }

    /// A new name `%fp8_N`.
    pub fn fresh(&mut self) -> String {
        loop {
            let name = format!("%fp8_{}", self.next);
            self.next += 1;
            if self.used.insert(name.clone()) {
                return name;
            }
        }
    }
}

/// An op with a dictionary of properties.
pub fn with_props(mut op: Op, props: Vec<(&str, String)>) -> Op {
    set_props(&mut op, props);
    op
}

/// Replaces an op's properties with `props`.
pub fn set_props(op: &mut Op, props: Vec<(&str, String)>) {
    op.properties = Some(AttrDict {
        entries: props
            .into_iter()
            .map(|(k, v)| Attr {
                name: k.to_string(),
                value: Some(v),
            })
            .collect(),
    });
}

/// A per-tensor or per-channel scale.
#[derive(Clone, Debug, PartialEq)]
pub enum Scale {
    /// One f32 for the whole tensor.
    PerTensor(f32),
    /// One f32 per index of dimension `dim` of the weight.
    PerChannel {
        /// The weight dimension the scales run along.
        dim: usize,
        /// The scales.
        scales: Vec<f32>,
    },
}

/// `dense<...> : tensor<...xf32>` for a scale vector or scalar.
pub fn scale_constant(scales: &[f32], scalar: bool) -> (String, TensorType) {
    let ty = TensorType {
        dims: if scalar {
            vec![]
        } else {
            vec![Dim::Static(scales.len() as u64)]
        },
        element: ElementType::F32,
        encoding: None,
    };
    let body = if scalar {
        fmt_f32(scales.first().copied().unwrap_or(1.0))
    } else {
        let items: Vec<String> = scales.iter().map(|s| fmt_f32(*s)).collect();
        format!("[{}]", items.join(", "))
    };
    (format!("dense<{body}> : {ty}"), ty)
}

/// Context for building ops: ids, names, position and location of the op they stand for.
pub struct Emitter<'a> {
    /// The module (for ids).
    pub module: &'a mut Module,
    /// Names.
    pub names: &'a mut Names,
}

impl Emitter<'_> {
    /// A new op id.
    pub fn id(&mut self) -> u32 {
        self.module.fresh_id()
    }

    /// `result = constant dense<scale(s)>`; returns the op and its type.
    pub fn constant(
        &mut self,
        result: &str,
        scales: &[f32],
        scalar: bool,
        pos: Pos,
        loc: &Option<String>,
    ) -> (Op, TensorType) {
        let (value, ty) = scale_constant(scales, scalar);
        let op = Op::simple(
            self.id(),
            pos,
            Some(result),
            "stablehlo.constant",
            vec![],
            vec![],
            vec![Type::Tensor(ty.clone())],
            loc.clone(),
        );
        (with_props(op, vec![("value", value)]), ty)
    }

    /// Ops computing `out = f32(src) * scale` (then converted to `element` if it is not f32);
    /// `channel` is the dimension of `src`'s type the per-channel scales run along.
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize(
        &mut self,
        src: &str,
        src_ty: &TensorType,
        element: &ElementType,
        scale: &Scale,
        channel: Option<usize>,
        out: &str,
        pos: Pos,
        loc: &Option<String>,
        convert: Convert,
    ) -> Vec<Op> {
        let f32_ty = Type::Tensor(src_ty.with_element(ElementType::F32));
        let mut ops = Vec::new();
        let converted = self.names.fresh();
        let to_f32 = Op::simple(
            self.id(),
            pos,
            Some(&converted),
            match convert {
                Convert::Plain => "stablehlo.convert",
                Convert::Opaque => "stablehlo.custom_call",
            },
            vec![src.to_string()],
            vec![Type::Tensor(src_ty.clone())],
            vec![f32_ty.clone()],
            loc.clone(),
        );
        if convert == Convert::Opaque {
            let per_tensor = match scale {
                Scale::PerTensor(s) => Some(*s),
                Scale::PerChannel { .. } => None,
            };
            ops.push(with_props(
                to_f32,
                vec![
                    ("api_version", "4 : i32".into()),
                    (
                        "backend_config",
                        format!("{{scale = {} : f32}}", fmt_f32(per_tensor.unwrap_or(1.0))),
                    ),
                    ("call_target_name", "\"fp8xla_dequantize\"".into()),
                ],
            ));
            if per_tensor.is_some() {
                // the scale is applied by the custom call itself
                return self.finish(ops, converted, &f32_ty, src_ty, element, out, pos, loc);
            }
        } else {
            ops.push(to_f32);
        }
        let (scales, scalar, bdims) = match (scale, channel) {
            (Scale::PerTensor(s), _) => (vec![*s], true, vec![]),
            (Scale::PerChannel { scales, .. }, Some(c)) => (scales.clone(), false, vec![c as i64]),
            (Scale::PerChannel { scales, .. }, None) => (scales.clone(), false, vec![0]),
        };
        let c = self.names.fresh();
        let (cop, cty) = self.constant(&c, &scales, scalar, pos, loc);
        ops.push(cop);
        let b = self.names.fresh();
        let bop = Op::simple(
            self.id(),
            pos,
            Some(&b),
            "stablehlo.broadcast_in_dim",
            vec![c],
            vec![Type::Tensor(cty)],
            vec![f32_ty.clone()],
            loc.clone(),
        );
        ops.push(with_props(
            bop,
            vec![("broadcast_dimensions", array_i64(&bdims))],
        ));
        let m = self.names.fresh();
        ops.push(Op::simple(
            self.id(),
            pos,
            Some(&m),
            "stablehlo.multiply",
            vec![converted, b],
            vec![f32_ty.clone(), f32_ty.clone()],
            vec![f32_ty.clone()],
            loc.clone(),
        ));
        self.finish(ops, m, &f32_ty, src_ty, element, out, pos, loc)
    }

    /// Ends a dequantization whose float32 value is `value`: renames it to `out`, converting
    /// to `element` when that is not f32.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        mut ops: Vec<Op>,
        value: String,
        f32_ty: &Type,
        src_ty: &TensorType,
        element: &ElementType,
        out: &str,
        pos: Pos,
        loc: &Option<String>,
    ) -> Vec<Op> {
        if *element == ElementType::F32 {
            let last = ops.last_mut().expect("a dequantization has ops");
            last.results[0].name = out.to_string();
            return ops;
        }
        ops.push(Op::simple(
            self.id(),
            pos,
            Some(out),
            "stablehlo.convert",
            vec![value],
            vec![f32_ty.clone()],
            vec![Type::Tensor(src_ty.with_element(element.clone()))],
            loc.clone(),
        ));
        ops
    }
}

/// How FP8 values become float32 in a dequantization.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Convert {
    /// `stablehlo.convert`: XLA may move it, e.g. hoist it out of a loop when its input is
    /// loop-invariant (right for a whole weight that some unsupported op reads every step).
    Plain,
    /// The `fp8xla_dequantize` custom call, which XLA cannot move. After a row gather this
    /// matters: XLA rewrites `convert(gather(table))` into `gather(convert(table))` and then
    /// hoists the convert of the whole embedding table out of the decode loop, so every
    /// generate call would convert all 168 M entries and hold a 16-bit copy of the table.
    Opaque,
}
