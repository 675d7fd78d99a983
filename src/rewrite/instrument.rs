//! The `instrument` pass: `fp8xla_observe` on the activation of every weight `dot_general`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::emit::{with_props, Names};
use super::flow;
use super::ir::{ElementType, Op};
use super::loc_json;
use super::options::{self, arg_paths, InstrumentJson};
use super::pipeline::{self, Context, Pass};
use super::RewriteError;

/// Runs the pass; see the module documentation of [`super`] for the options and the table.
pub fn instrument(module_text: &str, options_json: &str) -> Result<(String, String), RewriteError> {
    let opts: InstrumentJson = options::parse(options_json, "the instrument options")?;
    let mut cx = Context::parse(module_text)?;
    let mut table = Value::Null;
    pipeline::run(&mut cx, &mut table, &[&Instrument(opts)])?;
    Ok((
        cx.print(),
        serde_json::to_string_pretty(&table).unwrap_or_default(),
    ))
}

/// The pass `instrument`; its state is the sites table.
struct Instrument(InstrumentJson);

impl Pass<Value> for Instrument {
    fn name(&self) -> &'static str {
        "instrument"
    }

    fn run(&self, cx: &mut Context, table: &mut Value) -> Result<(), RewriteError> {
        *table = observe_sites(cx, &self.0)?;
        Ok(())
    }
}

/// Inserts the observers; returns the sites table.
fn observe_sites(cx: &mut Context, opts: &InstrumentJson) -> Result<Value, RewriteError> {
    let entry = opts.entry.clone().unwrap_or_else(|| "main".into());
    let paths: BTreeMap<usize, String> = arg_paths(&opts.args);
    let listed = opts.weights.is_some();
    let weights = opts.weights.iter().flatten().map(|i| i.0);
    let (module, aliases) = (&mut cx.module, &cx.aliases);

    let func = flow::find_func(module, &entry).ok_or_else(|| {
        RewriteError::new(
            "instrument",
            module.top.pos,
            &format!("an entry function `@{entry}`"),
            "no such function",
        )
    })?;
    let entry_args = flow::func_args(func);
    let mut args: BTreeMap<usize, Option<ElementType>> = BTreeMap::new();
    if listed {
        for w in weights {
            args.insert(w, None);
        }
    } else {
        for (i, (ty, _)) in entry_args.iter().enumerate() {
            if ty
                .as_tensor()
                .is_some_and(|t| t.element.is_quantizable_float() && t.rank() >= 2)
            {
                args.insert(i, None);
            }
        }
    }
    let flow = flow::follow(module, &entry, &args, "instrument")?;
    let sites = flow::sites(module, &flow)?;
    let mut names = Names::new(module);
    let mut table = Vec::new();
    for s in &sites {
        let op = module.top.find(s.op).expect("site op exists").clone();
        let a = 1 - s.weight_operand;
        let (Some(x), Some(ty)) = (op.operands.get(a), op.operand_types.get(a)) else {
            continue;
        };
        let obs = names.fresh();
        let id = module.fresh_id();
        let call = Op::simple(
            id,
            op.pos,
            Some(&obs),
            "stablehlo.custom_call",
            vec![x.clone()],
            vec![ty.clone()],
            vec![ty.clone()],
            op.loc.clone(),
        );
        let call = with_props(
            call,
            vec![
                ("api_version", "4 : i32".into()),
                ("backend_config", format!("{{site = {} : i64}}", s.site)),
                ("call_target_name", "\"fp8xla_observe\"".into()),
                ("has_side_effect", "true".into()),
            ],
        );
        module.insert_before(s.op, vec![call]);
        if let Some(dot) = module.top.find_mut(s.op) {
            dot.operands[a] = obs;
        }
        let arg_loc = entry_args
            .get(s.arg)
            .and_then(|(_, l)| l.clone())
            .map(|l| loc_json(&Some(l), aliases));
        let t = ty.as_tensor();
        table.push(json!({
            "site": s.site,
            "arg": s.arg,
            "arg_name": arg_loc,
            "path": paths.get(&s.arg),
            "function": s.function,
            "loc": loc_json(&op.loc, aliases),
            "weight_operand": if s.weight_operand == 1 { "rhs" } else { "lhs" },
            "transposed_weight": s.transposed.is_some(),
            "activation_shape": t.and_then(|t| t.static_shape()),
            "activation_dtype": t.map(|t| t.element.to_string()),
        }));
    }
    Ok(json!({
        "pass": "instrument",
        "entry": entry,
        "weights": args.keys().collect::<Vec<_>>(),
        "sites": Value::Array(table),
    }))
}
