//! Parser for MLIR's generic operation form.
//!
//! Grammar (whitespace, including newlines, is insignificant between tokens):
//!
//! ```text
//! module     := alias* op alias* EOF
//! alias      := ('#' | '!') ident '=' value            (value up to the end of its line)
//! op         := (results '=')? string '(' values? ')' successors? ('<' dict '>')?
//!               ('(' region (',' region)* ')')? dict? ':' '(' types? ')' '->' results-types loc?
//! region     := '{' block* '}'
//! block      := ('^' ident ('(' block-arg (',' block-arg)* ')')? ':')? op*
//! dict       := '{' (name ('=' value)?) (',' …)* '}'   (values kept as text, brackets balanced)
//! ```
//!
//! The parser never panics: every byte access is checked, nesting depth is bounded, and each
//! failure is a [`RewriteError`] with line:column, what was expected and what came.

use super::ir::{
    Attr, AttrDict, Block, BlockArg, Dim, ElementType, Module, Op, Pos, Region, ResultGroup,
    TensorType, Type,
};
use super::RewriteError;

/// Deepest nesting of brackets inside a value the parser accepts.
pub const MAX_DEPTH: usize = 200;

/// Deepest nesting of regions the parser accepts (exported modules nest a handful of levels;
/// the bound keeps recursion far from the stack limit).
pub const MAX_REGION_DEPTH: usize = 48;

/// Parses a module printed in MLIR's generic form.
pub fn parse_module(text: &str) -> Result<Module, RewriteError> {
    let mut p = Parser {
        src: text,
        pos: 0,
        next_id: 0,
        line_starts: line_starts(text),
    };
    let mut leading = Vec::new();
    p.skip_ws();
    while p.peek() == Some(b'#') || p.peek() == Some(b'!') {
        leading.push(p.alias()?);
        p.skip_ws();
    }
    if p.at_end() {
        return Err(p.error("an operation in generic form (`\"builtin.module\"() ...`)"));
    }
    let top = p.op(0)?;
    let mut trailing = Vec::new();
    p.skip_ws();
    while !p.at_end() {
        if p.peek() == Some(b'#') || p.peek() == Some(b'!') {
            trailing.push(p.alias()?);
        } else {
            return Err(p.error("an alias definition (`#loc1 = ...`) or the end of the input"));
        }
        p.skip_ws();
    }
    Ok(Module {
        leading,
        top,
        trailing,
        next_id: p.next_id,
    })
}

/// Parses a type (`tensor<2x3xf32>`, `!stablehlo.token`, …).
pub fn parse_type(text: &str) -> Result<Type, RewriteError> {
    let mut p = Parser {
        src: text,
        pos: 0,
        next_id: 0,
        line_starts: line_starts(text),
    };
    p.skip_ws();
    let t = p.ty()?;
    p.skip_ws();
    if !p.at_end() {
        return Err(p.error("the end of the type"));
    }
    Ok(t)
}

/// Line and column (1-based, column in characters) of byte offset `pos` in `src`.
pub fn line_col(src: &str, pos: usize) -> Pos {
    let pos = pos.min(src.len());
    let before = src.get(..pos).unwrap_or_else(|| {
        // Not on a char boundary: back up to one.
        let mut p = pos;
        while p > 0 && !src.is_char_boundary(p) {
            p -= 1;
        }
        &src[..p]
    });
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    Pos { line, column }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    next_id: u32,
    /// Byte offsets where lines start.
    line_starts: Vec<usize>,
}

fn line_starts(src: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(
            src.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect()
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.' | b'-')
}

impl<'a> Parser<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn peek_at(&self, k: usize) -> Option<u8> {
        self.bytes().get(self.pos + k).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn starts_with(&self, s: &str) -> bool {
        self.bytes()
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(s.as_bytes()))
    }

    fn skip_ws(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                Some(b'/') if self.peek_at(1) == Some(b'/') => {
                    while let Some(b) = self.peek() {
                        if b == b'\n' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn here(&self) -> Pos {
        let pos = self.pos.min(self.src.len());
        let line = self.line_starts.partition_point(|&s| s <= pos).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = match self.src.get(start..pos) {
            Some(s) => s.chars().count() + 1,
            None => line_col(self.src, pos).column,
        };
        Pos { line, column }
    }

    /// A short description of what is at the cursor, for error messages.
    fn found(&self) -> String {
        if self.at_end() {
            return "end of input".to_string();
        }
        let rest = self.bytes().get(self.pos..).unwrap_or(&[]);
        let take: Vec<u8> = rest
            .iter()
            .take(24)
            .take_while(|&&b| b != b'\n')
            .copied()
            .collect();
        if take.is_empty() {
            return "end of line".to_string();
        }
        format!("`{}`", String::from_utf8_lossy(&take))
    }

    fn error(&self, expected: &str) -> RewriteError {
        RewriteError::new("parser", self.here(), expected, &self.found())
    }

    fn expect(&mut self, s: &str) -> Result<(), RewriteError> {
        self.skip_ws();
        if self.starts_with(s) {
            self.pos += s.len();
            Ok(())
        } else {
            Err(self.error(&format!("`{s}`")))
        }
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        if self.starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn slice(&self, start: usize, end: usize) -> Result<&'a str, RewriteError> {
        self.src
            .get(start..end)
            .ok_or_else(|| self.error("text on UTF-8 character boundaries"))
    }

    /// A string literal with escapes, returned with its quotes.
    fn string_lit(&mut self) -> Result<&'a str, RewriteError> {
        self.skip_ws();
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return Err(self.error("a string literal"));
        }
        self.pos += 1;
        loop {
            match self.peek() {
                None | Some(b'\n') => {
                    self.pos = start;
                    return Err(self.error("a closing `\"` on the same line"));
                }
                Some(b'\\') => self.pos += 2,
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(_) => self.pos += 1,
            }
        }
        self.slice(start, self.pos.min(self.src.len()))
    }

    /// `%name` or `%name#k` (with `allow_index`).
    fn value_name(&mut self, allow_index: bool) -> Result<&'a str, RewriteError> {
        self.skip_ws();
        let start = self.pos;
        if self.peek() != Some(b'%') {
            return Err(self.error("a value name (`%...`)"));
        }
        self.pos += 1;
        let id_start = self.pos;
        while self.peek().is_some_and(is_id_char) {
            self.pos += 1;
        }
        if self.pos == id_start {
            return Err(self.error("a value name after `%`"));
        }
        if allow_index && self.peek() == Some(b'#') {
            self.pos += 1;
            let d = self.pos;
            while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                self.pos += 1;
            }
            if self.pos == d {
                return Err(self.error("a result number after `#`"));
            }
        }
        self.slice(start, self.pos)
    }

    fn number(&mut self) -> Result<usize, RewriteError> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits = self.slice(start, self.pos)?;
        digits.parse::<usize>().map_err(|_| {
            self.pos = start;
            self.error("a decimal count")
        })
    }

    /// Text of a balanced value starting at the cursor, ending before a top-level character in
    /// `stops` (or the end of the line when `stop_at_newline`). Brackets `()[]{}<>` must balance;
    /// `->` is not a bracket; string literals are skipped whole.
    fn balanced(&mut self, stops: &[u8], stop_at_newline: bool) -> Result<&'a str, RewriteError> {
        self.skip_ws_inline();
        let start = self.pos;
        let mut stack: Vec<u8> = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                if stack.is_empty() && stop_at_newline {
                    break;
                }
                return Err(self.error("the rest of a value (unbalanced brackets)"));
            };
            if stack.is_empty() && (stops.contains(&b) || (stop_at_newline && b == b'\n')) {
                break;
            }
            match b {
                b'"' => {
                    self.string_lit()?;
                    continue;
                }
                b'-' if self.peek_at(1) == Some(b'>') => {
                    self.pos += 2;
                    continue;
                }
                b'(' | b'[' | b'{' | b'<' => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(self.error("less deeply nested brackets"));
                    }
                    stack.push(match b {
                        b'(' => b')',
                        b'[' => b']',
                        b'{' => b'}',
                        _ => b'>',
                    });
                }
                b')' | b']' | b'}' | b'>' if stack.pop() != Some(b) => {
                    return Err(self.error("balanced brackets in a value"));
                }
                _ => {}
            }
            self.pos += 1;
        }
        let text = self.slice(start, self.pos)?.trim_end();
        if text.is_empty() {
            return Err(self.error("a value"));
        }
        Ok(text)
    }

    fn skip_ws_inline(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.pos += 1;
        }
    }

    fn alias(&mut self) -> Result<String, RewriteError> {
        let start = self.pos;
        self.pos += 1;
        let id = self.pos;
        while self.peek().is_some_and(is_id_char) {
            self.pos += 1;
        }
        if self.pos == id {
            return Err(self.error("an alias name after `#`"));
        }
        self.skip_ws_inline();
        if self.peek() != Some(b'=') {
            return Err(self.error("`=` in an alias definition"));
        }
        self.pos += 1;
        self.balanced(&[], true)?;
        Ok(self.slice(start, self.pos)?.trim_end().to_string())
    }

    fn op(&mut self, depth: usize) -> Result<Op, RewriteError> {
        if depth > MAX_REGION_DEPTH {
            return Err(self.error("less deeply nested regions"));
        }
        self.skip_ws();
        let pos = self.here();
        let mut results = Vec::new();
        if self.peek() == Some(b'%') {
            loop {
                let name = self.value_name(false)?.to_string();
                let mut count = 1;
                let mut explicit_count = false;
                if self.peek() == Some(b':') {
                    self.pos += 1;
                    count = self.number()?;
                    explicit_count = true;
                    if count == 0 {
                        return Err(self.error("a result count of at least 1"));
                    }
                }
                results.push(ResultGroup {
                    name,
                    count,
                    explicit_count,
                });
                if !self.eat(",") {
                    break;
                }
            }
            self.expect("=")?;
        }
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return Err(self.error(
                "an operation name in quotes (generic form, e.g. `\"stablehlo.add\"(...)`; \
                 print the module with print_generic_op_form=True)",
            ));
        }
        let quoted = self.string_lit()?;
        let name = quoted[1..quoted.len() - 1].to_string();
        self.expect("(")?;
        let mut operands = Vec::new();
        if !self.eat(")") {
            loop {
                operands.push(self.value_name(true)?.to_string());
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.skip_ws();
        let mut successors = None;
        if self.peek() == Some(b'[') {
            successors = Some(self.balanced(b" <({:\n", false)?.to_string());
            self.skip_ws();
        }
        let mut properties = None;
        if self.starts_with("<{") {
            self.pos += 1;
            properties = Some(self.dict()?);
            self.expect(">")?;
            self.skip_ws();
        }
        let mut regions = Vec::new();
        if self.peek() == Some(b'(') {
            self.pos += 1;
            loop {
                regions.push(self.region(depth)?);
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
            self.skip_ws();
        }
        let mut attributes = None;
        if self.peek() == Some(b'{') {
            attributes = Some(self.dict()?);
        }
        self.expect(":")?;
        self.expect("(")?;
        let mut operand_types = Vec::new();
        if !self.eat(")") {
            loop {
                operand_types.push(self.ty()?);
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect("->")?;
        self.skip_ws();
        let mut result_types = Vec::new();
        let mut parenthesized_result = false;
        if self.peek() == Some(b'(') {
            self.pos += 1;
            parenthesized_result = true;
            if !self.eat(")") {
                loop {
                    result_types.push(self.ty()?);
                    if self.eat(")") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
        } else {
            result_types.push(self.ty()?);
        }
        if result_types.len() != 1 {
            parenthesized_result = false;
        }
        let loc = self.loc()?;
        let id = self.next_id;
        self.next_id += 1;
        Ok(Op {
            id,
            pos,
            results,
            name,
            operands,
            successors,
            properties,
            regions,
            attributes,
            operand_types,
            result_types,
            parenthesized_result,
            loc,
        })
    }

    fn loc(&mut self) -> Result<Option<String>, RewriteError> {
        self.skip_ws_inline();
        if self.starts_with("loc(") {
            let start = self.pos;
            self.pos += 3;
            self.balanced_group()?;
            Ok(Some(self.slice(start, self.pos)?.to_string()))
        } else {
            Ok(None)
        }
    }

    /// Consumes one bracketed group starting at the cursor (`(...)`, `<...>`, …).
    fn balanced_group(&mut self) -> Result<(), RewriteError> {
        let start = self.pos;
        let Some(open) = self.peek() else {
            return Err(self.error("an opening bracket"));
        };
        if !matches!(open, b'(' | b'[' | b'{' | b'<') {
            return Err(self.error("an opening bracket"));
        }
        self.pos += 1;
        // Scan the inside up to the matching close.
        let close = match open {
            b'(' => b')',
            b'[' => b']',
            b'{' => b'}',
            _ => b'>',
        };
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(());
        }
        self.balanced(&[close], false).inspect_err(|_| {
            self.pos = self.pos.max(start);
        })?;
        if self.peek() != Some(close) {
            return Err(self.error(&format!("`{}`", close as char)));
        }
        self.pos += 1;
        Ok(())
    }

    fn region(&mut self, depth: usize) -> Result<Region, RewriteError> {
        self.expect("{")?;
        let mut blocks = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                None => return Err(self.error("`}` closing a region")),
                Some(b'^') => blocks.push(self.block(depth, true)?),
                Some(_) if blocks.is_empty() => blocks.push(self.block(depth, false)?),
                Some(_) => return Err(self.error("an operation, a block label or `}`")),
            }
        }
        Ok(Region { blocks })
    }

    fn block(&mut self, depth: usize, labeled: bool) -> Result<Block, RewriteError> {
        let mut label = None;
        let mut args = Vec::new();
        if labeled {
            let start = self.pos;
            self.pos += 1;
            while self.peek().is_some_and(is_id_char) {
                self.pos += 1;
            }
            if self.pos == start + 1 {
                return Err(self.error("a block name after `^`"));
            }
            label = Some(self.slice(start, self.pos)?.to_string());
            if self.eat("(") && !self.eat(")") {
                loop {
                    let name = self.value_name(false)?.to_string();
                    self.expect(":")?;
                    self.skip_ws();
                    let ty = self.ty()?;
                    let loc = self.loc()?;
                    args.push(BlockArg { name, ty, loc });
                    if self.eat(")") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            self.expect(":")?;
        }
        let mut ops = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'}') | Some(b'^') => break,
                None => return Err(self.error("an operation or `}`")),
                Some(_) => ops.push(self.op(depth + 1)?),
            }
        }
        Ok(Block { label, args, ops })
    }

    /// `{name = value, unit, "quoted name" = value}`; values kept as text.
    fn dict(&mut self) -> Result<AttrDict, RewriteError> {
        self.expect("{")?;
        let mut entries = Vec::new();
        if self.eat("}") {
            return Ok(AttrDict { entries });
        }
        loop {
            self.skip_ws();
            let name = if self.peek() == Some(b'"') {
                self.string_lit()?.to_string()
            } else {
                let start = self.pos;
                while self.peek().is_some_and(is_id_char) {
                    self.pos += 1;
                }
                if self.pos == start {
                    return Err(self.error("an attribute name"));
                }
                self.slice(start, self.pos)?.to_string()
            };
            let value = if self.eat("=") {
                self.skip_ws();
                Some(self.balanced(b",}", false)?.to_string())
            } else {
                None
            };
            entries.push(Attr { name, value });
            if self.eat("}") {
                break;
            }
            self.expect(",")?;
        }
        Ok(AttrDict { entries })
    }

    fn ty(&mut self) -> Result<Type, RewriteError> {
        self.skip_ws();
        let start = self.pos;
        if self.starts_with("tensor<") {
            self.pos += "tensor<".len();
            if let Some(t) = self.tensor_body()? {
                return Ok(Type::Tensor(t));
            }
            // Unranked or unusual: keep as text.
            self.pos = start + "tensor".len();
            self.balanced_group()?;
            return Ok(Type::Other(self.slice(start, self.pos)?.to_string()));
        }
        // Any other type: identifier characters (with `!`) then optional balanced `<...>`.
        if self.peek() == Some(b'!') {
            self.pos += 1;
        }
        while self.peek().is_some_and(is_id_char) {
            self.pos += 1;
        }
        if self.peek() == Some(b'<') {
            self.balanced_group()?;
        }
        if self.pos == start {
            return Err(self.error("a type"));
        }
        Ok(Type::Other(self.slice(start, self.pos)?.to_string()))
    }

    /// After `tensor<`: dims `x` element [`, encoding`] `>`. `None` if it is not a ranked
    /// tensor this IR models (the caller keeps it as text).
    fn tensor_body(&mut self) -> Result<Option<TensorType>, RewriteError> {
        let mut dims = Vec::new();
        loop {
            let save = self.pos;
            let dim = if self.peek() == Some(b'?') {
                self.pos += 1;
                Dim::Dynamic
            } else if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                let start = self.pos;
                while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    self.pos += 1;
                }
                match self.slice(start, self.pos)?.parse::<u64>() {
                    Ok(n) => Dim::Static(n),
                    Err(_) => return Ok(None),
                }
            } else {
                break;
            };
            if self.peek() == Some(b'x') {
                self.pos += 1;
                dims.push(dim);
            } else {
                self.pos = save;
                break;
            }
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            self.pos += 1;
        }
        if self.pos == start || self.peek() == Some(b'<') {
            return Ok(None);
        }
        let element = ElementType::from_name(self.slice(start, self.pos)?);
        let mut encoding = None;
        if self.peek() == Some(b',') {
            self.pos += 1;
            self.skip_ws();
            encoding = Some(self.balanced(b">", false)?.to_string());
        }
        if self.peek() != Some(b'>') {
            return Ok(None);
        }
        self.pos += 1;
        Ok(Some(TensorType {
            dims,
            element,
            encoding,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types() {
        let t = parse_type("tensor<2x?x3xf8E4M3FN>").unwrap();
        let tt = t.as_tensor().unwrap();
        assert_eq!(tt.dims, vec![Dim::Static(2), Dim::Dynamic, Dim::Static(3)]);
        assert_eq!(tt.element, ElementType::F8E4M3FN);
        assert_eq!(t.to_string(), "tensor<2x?x3xf8E4M3FN>");
        assert_eq!(
            parse_type("tensor<f32>").unwrap().to_string(),
            "tensor<f32>"
        );
        assert_eq!(
            parse_type("tensor<4xindex>")
                .unwrap()
                .as_tensor()
                .unwrap()
                .element,
            ElementType::Other("index".into())
        );
        assert_eq!(
            parse_type("tensor<*xf32>").unwrap(),
            Type::Other("tensor<*xf32>".into())
        );
        assert_eq!(
            parse_type("!stablehlo.token").unwrap(),
            Type::Other("!stablehlo.token".into())
        );
        assert_eq!(
            parse_type("tensor<2xcomplex<f32>>").unwrap().to_string(),
            "tensor<2xcomplex<f32>>"
        );
    }

    #[test]
    fn error_position() {
        let e =
            parse_module("\"builtin.module\"() ({\n  %0 = \"a.b\"(%x : () -> ()\n}) : () -> ()")
                .unwrap_err();
        assert_eq!((e.line, e.column), (2, 17));
        assert!(e.expected.contains("`,`"), "{e}");
        assert!(e.to_string().contains("parser"), "{e}");
    }
}
