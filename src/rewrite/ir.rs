//! The small IR the passes work on: a module of operations in MLIR's generic form.
//!
//! Only what the passes need is structured: op names, operands, results, regions, blocks, block
//! arguments and tensor types. Property and attribute values, locations and alias definitions are
//! kept as the exact text that came in, so parse → print reproduces the input.

use std::fmt;

/// A parsed module: the alias definitions around the top-level operation (`#loc1 = loc("x")`),
/// and the top-level operation itself (normally `"builtin.module"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Alias definitions printed before the top-level operation, each without its newline.
    pub leading: Vec<String>,
    /// The top-level operation.
    pub top: Op,
    /// Alias definitions printed after the top-level operation.
    pub trailing: Vec<String>,
    /// Next free op id (ids are unique within a module, stable across edits).
    pub next_id: u32,
}

/// Where an op came from in the parsed text (1-based), or where the op it replaces came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A group of results: `%484:38` is one group named `%484` with 38 results (used as `%484#k`),
/// `%3` one group with one result.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultGroup {
    /// Name including `%`.
    pub name: String,
    /// Number of results (printed as `:count` when it is not 1).
    pub count: usize,
    /// Whether the count was written explicitly (`%x:1`).
    pub explicit_count: bool,
}

/// One entry of an attribute dictionary, its value kept as text (`None` for a unit attribute).
#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    /// Name as written (bare identifier or a quoted string).
    pub name: String,
    /// Value text, exactly as written.
    pub value: Option<String>,
}

/// An attribute dictionary (`{a = 1 : i32, b}`), entries in written order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttrDict {
    /// The entries.
    pub entries: Vec<Attr>,
}

impl AttrDict {
    /// The value text of `name`, if present with a value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.value.as_deref())
    }

    /// Sets (or adds, keeping names sorted like MLIR prints them) `name = value`.
    pub fn set(&mut self, name: &str, value: String) {
        if let Some(a) = self.entries.iter_mut().find(|a| a.name == name) {
            a.value = Some(value);
            return;
        }
        let at = self
            .entries
            .iter()
            .position(|a| a.name.as_str() > name)
            .unwrap_or(self.entries.len());
        self.entries.insert(
            at,
            Attr {
                name: name.to_string(),
                value: Some(value),
            },
        );
    }
}

/// Element types the passes distinguish; anything else is kept as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// `f32`
    F32,
    /// `f64`
    F64,
    /// `bf16`
    Bf16,
    /// `f16`
    F16,
    /// `f8E4M3FN`
    F8E4M3FN,
    /// `f8E5M2`
    F8E5M2,
    /// `i1`, `i8`, `i32`, … and `ui8`, … : signless or unsigned integers of a width.
    Int {
        /// Bit width.
        width: u32,
        /// `ui` instead of `i`.
        unsigned: bool,
    },
    /// Anything else (`index`, `complex<f32>`, other float types, …), as written.
    Other(String),
}

impl ElementType {
    /// Parses an element type name; never fails (unknown names become `Other`).
    pub fn from_name(s: &str) -> ElementType {
        match s {
            "f32" => ElementType::F32,
            "f64" => ElementType::F64,
            "bf16" => ElementType::Bf16,
            "f16" => ElementType::F16,
            "f8E4M3FN" => ElementType::F8E4M3FN,
            "f8E5M2" => ElementType::F8E5M2,
            _ => {
                let (unsigned, digits) = if let Some(d) = s.strip_prefix("ui") {
                    (true, d)
                } else if let Some(d) = s.strip_prefix('i') {
                    (false, d)
                } else {
                    return ElementType::Other(s.to_string());
                };
                match digits.parse::<u32>() {
                    Ok(width) if !digits.starts_with('0') && !digits.starts_with('+') => {
                        ElementType::Int { width, unsigned }
                    }
                    _ => ElementType::Other(s.to_string()),
                }
            }
        }
    }

    /// Whether this is a floating-point type the passes can quantize from.
    pub fn is_quantizable_float(&self) -> bool {
        matches!(
            self,
            ElementType::F32 | ElementType::F64 | ElementType::Bf16 | ElementType::F16
        )
    }

    /// Whether this is one of the FP8 types.
    pub fn is_fp8(&self) -> bool {
        matches!(self, ElementType::F8E4M3FN | ElementType::F8E5M2)
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementType::F32 => f.write_str("f32"),
            ElementType::F64 => f.write_str("f64"),
            ElementType::Bf16 => f.write_str("bf16"),
            ElementType::F16 => f.write_str("f16"),
            ElementType::F8E4M3FN => f.write_str("f8E4M3FN"),
            ElementType::F8E5M2 => f.write_str("f8E5M2"),
            ElementType::Int { width, unsigned } => {
                write!(f, "{}{}", if *unsigned { "ui" } else { "i" }, width)
            }
            ElementType::Other(s) => f.write_str(s),
        }
    }
}

/// A dimension of a tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A static size.
    Static(u64),
    /// `?`
    Dynamic,
}

/// `tensor<2x3xf32>` (ranked; `tensor<*xf32>` is kept as [`Type::Other`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    /// Dimensions, outermost first.
    pub dims: Vec<Dim>,
    /// Element type.
    pub element: ElementType,
    /// `, #encoding` text after the element type, without the comma.
    pub encoding: Option<String>,
}

impl TensorType {
    /// The static shape, if every dimension is static.
    pub fn static_shape(&self) -> Option<Vec<u64>> {
        self.dims
            .iter()
            .map(|d| match d {
                Dim::Static(n) => Some(*n),
                Dim::Dynamic => None,
            })
            .collect()
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The same shape with another element type.
    pub fn with_element(&self, element: ElementType) -> TensorType {
        TensorType {
            dims: self.dims.clone(),
            element,
            encoding: self.encoding.clone(),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor<")?;
        for d in &self.dims {
            match d {
                Dim::Static(n) => write!(f, "{n}x")?,
                Dim::Dynamic => f.write_str("?x")?,
            }
        }
        write!(f, "{}", self.element)?;
        if let Some(e) = &self.encoding {
            write!(f, ", {e}")?;
        }
        f.write_str(">")
    }
}

/// A type: a ranked tensor, or anything else kept as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    /// A ranked tensor.
    Tensor(TensorType),
    /// Any other type, as written (`!stablehlo.token`, `tuple<…>`, …).
    Other(String),
}

impl Type {
    /// The tensor type, if this is one.
    pub fn as_tensor(&self) -> Option<&TensorType> {
        match self {
            Type::Tensor(t) => Some(t),
            Type::Other(_) => None,
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Tensor(t) => t.fmt(f),
            Type::Other(s) => f.write_str(s),
        }
    }
}

/// A block argument: `%arg0: tensor<4xf32> loc("x")`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockArg {
    /// Name including `%`.
    pub name: String,
    /// Type.
    pub ty: Type,
    /// `loc(...)` text, if any.
    pub loc: Option<String>,
}

/// A block: optional label with arguments, then operations.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// `^bb0`, if the block was printed with a label.
    pub label: Option<String>,
    /// Arguments (only printed with a label).
    pub args: Vec<BlockArg>,
    /// Operations, the terminator last.
    pub ops: Vec<Op>,
}

/// A region: a list of blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Blocks, entry block first.
    pub blocks: Vec<Block>,
}

/// An operation in generic form:
/// `%r = "name"(%a, %b)[^succ] <{props}> ({regions}) {attrs} : (types) -> types loc(...)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// Module-unique id (not printed).
    pub id: u32,
    /// Position in the parsed text (not printed).
    pub pos: Pos,
    /// Result groups.
    pub results: Vec<ResultGroup>,
    /// Op name without quotes (`stablehlo.dot_general`).
    pub name: String,
    /// Operand names (`%3`, `%arg0`, `%484#30`).
    pub operands: Vec<String>,
    /// Successor list text (`[^bb1, ^bb2]`), kept as written.
    pub successors: Option<String>,
    /// Properties (`<{...}>`), if written.
    pub properties: Option<AttrDict>,
    /// Regions.
    pub regions: Vec<Region>,
    /// Discardable attributes (`{...}` after the regions), if written.
    pub attributes: Option<AttrDict>,
    /// Operand types of the trailing function type.
    pub operand_types: Vec<Type>,
    /// Result types of the trailing function type.
    pub result_types: Vec<Type>,
    /// Whether the single result type was written in parentheses.
    pub parenthesized_result: bool,
    /// `loc(...)` text, if any.
    pub loc: Option<String>,
}

impl Op {
    /// A new op with no regions, properties or attributes.
    #[allow(clippy::too_many_arguments)]
    pub fn simple(
        id: u32,
        pos: Pos,
        result: Option<&str>,
        name: &str,
        operands: Vec<String>,
        operand_types: Vec<Type>,
        result_types: Vec<Type>,
        loc: Option<String>,
    ) -> Op {
        Op {
            id,
            pos,
            results: result
                .map(|r| {
                    vec![ResultGroup {
                        name: r.to_string(),
                        count: 1,
                        explicit_count: false,
                    }]
                })
                .unwrap_or_default(),
            name: name.to_string(),
            operands,
            successors: None,
            properties: None,
            regions: Vec::new(),
            attributes: None,
            operand_types,
            result_types,
            parenthesized_result: false,
            loc,
        }
    }

    /// The property value text of `name`.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.properties.as_ref().and_then(|p| p.get(name))
    }

    /// The value names of all results (`%3`, or `%484#0` … `%484#37` for a group).
    pub fn result_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let single = self.results.len() == 1 && self.results[0].count == 1;
        for g in &self.results {
            if single || (g.count == 1 && !g.explicit_count) {
                names.push(g.name.clone());
            } else {
                for k in 0..g.count {
                    names.push(format!("{}#{k}", g.name));
                }
            }
        }
        names
    }

    /// Calls `f` on every op nested in this op's regions (not on this op), in pre-order.
    pub fn walk_nested<'a>(&'a self, f: &mut dyn FnMut(&'a Op)) {
        for r in &self.regions {
            for b in &r.blocks {
                for op in &b.ops {
                    f(op);
                    op.walk_nested(f);
                }
            }
        }
    }

    /// Calls `f` on this op and every nested op, in pre-order.
    pub fn walk<'a>(&'a self, f: &mut dyn FnMut(&'a Op)) {
        f(self);
        self.walk_nested(f);
    }

    /// Mutable pre-order walk over this op and every nested op.
    pub fn walk_mut(&mut self, f: &mut dyn FnMut(&mut Op)) {
        f(self);
        for r in &mut self.regions {
            for b in &mut r.blocks {
                for op in &mut b.ops {
                    op.walk_mut(f);
                }
            }
        }
    }

    /// The op with id `id` in this op's tree.
    pub fn find(&self, id: u32) -> Option<&Op> {
        if self.id == id {
            return Some(self);
        }
        for r in &self.regions {
            for b in &r.blocks {
                for op in &b.ops {
                    if let Some(found) = op.find(id) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }

    /// The op with id `id` in this op's tree, mutably.
    pub fn find_mut(&mut self, id: u32) -> Option<&mut Op> {
        if self.id == id {
            return Some(self);
        }
        for r in &mut self.regions {
            for b in &mut r.blocks {
                for op in &mut b.ops {
                    if let Some(found) = op.find_mut(id) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }

    /// The block that directly holds the op with id `id`, and the op's index in it.
    pub fn find_parent_mut(&mut self, id: u32) -> Option<(&mut Block, usize)> {
        for r in &mut self.regions {
            for b in &mut r.blocks {
                if let Some(i) = b.ops.iter().position(|o| o.id == id) {
                    return Some((b, i));
                }
                for op in &mut b.ops {
                    // Search children only if the id is somewhere below this op.
                    if op.find(id).is_some() {
                        return op.find_parent_mut(id);
                    }
                }
            }
        }
        None
    }
}

impl Module {
    /// A fresh op id.
    pub fn fresh_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The top-level functions (`func.func` ops in the module body).
    pub fn functions(&self) -> Vec<&Op> {
        self.top
            .regions
            .iter()
            .flat_map(|r| r.blocks.iter())
            .flat_map(|b| b.ops.iter())
            .filter(|o| o.name == "func.func")
            .collect()
    }

    /// Inserts `ops` before the op with id `id`. Returns false if `id` is not in the module.
    pub fn insert_before(&mut self, id: u32, ops: Vec<Op>) -> bool {
        match self.top.find_parent_mut(id) {
            Some((block, i)) => {
                block.ops.splice(i..i, ops);
                true
            }
            None => false,
        }
    }

    /// Inserts `ops` after the op with id `id`. Returns false if `id` is not in the module.
    pub fn insert_after(&mut self, id: u32, ops: Vec<Op>) -> bool {
        match self.top.find_parent_mut(id) {
            Some((block, i)) => {
                block.ops.splice(i + 1..i + 1, ops);
                true
            }
            None => false,
        }
    }

    /// Removes the op with id `id`. Returns false if `id` is not in the module.
    pub fn remove(&mut self, id: u32) -> bool {
        match self.top.find_parent_mut(id) {
            Some((block, i)) => {
                block.ops.remove(i);
                true
            }
            None => false,
        }
    }

    /// Gives every op of `op`'s tree a fresh id.
    pub fn renumber(&mut self, op: &mut Op) {
        let mut next = self.next_id;
        op.walk_mut(&mut |o| {
            o.id = next;
            next += 1;
        });
        self.next_id = next;
    }
}
