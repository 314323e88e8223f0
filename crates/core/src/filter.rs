//! The Cloud Pub/Sub subscription filter language, parsed into an AST.
//!
//! Source of truth: Google's "Filter messages from a subscription" page,
//! section "Syntax to create a filter"
//! (<https://cloud.google.com/pubsub/docs/subscription-message-filter>, also
//! served as <https://docs.cloud.google.com/pubsub/docs/filtering>). Where that
//! page is silent (whitespace, quoting style, escapes) we follow AIP-160
//! (<https://google.aip.dev/160>), the filtering grammar Google's filter
//! languages are built on, and CEL string-literal escapes, which is what "Unicode,
//! hexadecimal, and octal escape sequences" refers to.
//!
//! # Grammar
//!
//! ```text
//! filter      = [WS] [expression] [WS] EOF          ; empty or blank: every message matches
//! expression  = term {WS "AND" WS term}              ; AND and OR cannot be mixed at one
//!             | term {WS "OR" WS term}               ;   level: parenthesise instead
//! term        = ["NOT" WS | "-"] simple              ; one negation per term; NOT (NOT x) is fine
//! simple      = "(" [WS] expression [WS] ")"
//!             | "attributes" [WS] ":" [WS] key                            ; key exists
//!             | "attributes" "." key [WS] ("=" | "!=") [WS] string        ; value (in)equality
//!             | "hasPrefix(" [WS] "attributes" "." key [WS] "," [WS] string [WS] ")"
//! key         = bare | string                        ; bare = 1*(ASCII letter / digit / "_" / "-")
//! string      = '"' {char | escape} '"' | "'" {char | escape} "'"
//! escape      = "\" ( "a" | "b" | "f" | "n" | "r" | "t" | "v" | "\" | "'" | '"' | "`" | "?" )
//!             | "\x" 2HEX | "\X" 2HEX | "\u" 4HEX | "\U" 8HEX | "\" [0-3] 2[0-7]
//! WS          = 1*(Unicode white space)
//! ```
//!
//! Keywords (`AND`, `OR`, `NOT`), `attributes` and `hasPrefix` are case-sensitive.
//! No white space is allowed around the `.` of `attributes.KEY`, after a `-`
//! negation, or between `hasPrefix` and `(`. A filter is at most
//! [`MAX_FILTER_BYTES`] bytes.
//!
//! # Semantics
//!
//! | filter | matches a message whose attributes… |
//! |---|---|
//! | `attributes:k` | contain key `k` |
//! | `attributes.k = "v"` | contain `k` with value exactly `v` |
//! | `attributes.k != "v"` | do not contain `k` with value `v` (a missing `k` matches) |
//! | `hasPrefix(attributes.k, "p")` | contain `k` with a value starting with `p` |
//! | `NOT e`, `-e` | do not match `e` |

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// "The maximum length of a filter is 256 bytes."
pub const MAX_FILTER_BYTES: usize = 256;

/// One node of a parsed filter.
///
/// `And` and `Or` produced by [`parse`] always have at least two children and
/// keep the grouping the user wrote (`(a AND b) AND c` stays nested). Their
/// [`Display`](fmt::Display) output re-parses to the same tree; hand-built
/// `And`/`Or` nodes with fewer than two children still evaluate (empty `And`
/// is true, empty `Or` is false) but have no filter syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `attributes:KEY`
    Has(String),
    /// `attributes.KEY = "VALUE"`
    Eq(String, String),
    /// `attributes.KEY != "VALUE"`
    Ne(String, String),
    /// `hasPrefix(attributes.KEY, "PREFIX")`
    HasPrefix(String, String),
    /// `NOT expr` or `-expr`
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    /// Evaluate against an attribute lookup.
    pub fn eval<'a, F>(&self, get: &F) -> bool
    where
        F: Fn(&str) -> Option<&'a str>,
    {
        match self {
            Expr::Has(k) => get(k).is_some(),
            Expr::Eq(k, v) => get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => get(k) != Some(v.as_str()),
            Expr::HasPrefix(k, p) => get(k).is_some_and(|v| v.starts_with(p.as_str())),
            Expr::Not(e) => !e.eval(get),
            Expr::And(es) => es.iter().all(|e| e.eval(get)),
            Expr::Or(es) => es.iter().any(|e| e.eval(get)),
        }
    }
}

/// A parsed subscription filter. The empty filter matches every message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Filter {
    expr: Option<Expr>,
}

impl Filter {
    /// The empty filter: every message matches.
    pub fn all() -> Self {
        Filter { expr: None }
    }

    pub fn from_expr(expr: Expr) -> Self {
        Filter { expr: Some(expr) }
    }

    /// True for the empty filter.
    pub fn is_all(&self) -> bool {
        self.expr.is_none()
    }

    /// The AST, or `None` for the empty filter.
    pub fn expr(&self) -> Option<&Expr> {
        self.expr.as_ref()
    }

    pub fn into_expr(self) -> Option<Expr> {
        self.expr
    }

    pub fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.matches_with(|k| attributes.get(k).map(String::as_str))
    }

    /// Like [`Filter::matches`] for any attribute store.
    pub fn matches_with<'a, F>(&self, get: F) -> bool
    where
        F: Fn(&str) -> Option<&'a str>,
    {
        self.expr.as_ref().is_none_or(|e| e.eval(&get))
    }
}

impl FromStr for Filter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        parse(s)
    }
}

/// A filter that does not parse: where (byte offset into the filter) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// Byte offset into `filter`; always on a char boundary, at most `filter.len()`.
    pub position: usize,
    pub message: String,
    /// The filter text the position refers to (for [`FilterError::excerpt`]).
    pub filter: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "filter error at position {}: {}",
            self.position, self.message
        )
    }
}

impl std::error::Error for FilterError {}

impl FilterError {
    /// Two lines: the filter (control characters shown as spaces, long filters
    /// windowed around the error) and a caret under the error position.
    pub fn excerpt(&self) -> String {
        const WIDTH: usize = 72;
        let chars: Vec<char> = self
            .filter
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let col = self
            .filter
            .get(..self.position)
            .map_or(chars.len(), |s| s.chars().count());
        let (start, end) = if chars.len() <= WIDTH {
            (0, chars.len())
        } else {
            let start = col
                .saturating_sub(WIDTH / 2)
                .min(chars.len().saturating_sub(WIDTH));
            (start, (start + WIDTH).min(chars.len()))
        };
        let mut line = String::new();
        let mut caret = col - start;
        if start > 0 {
            line.push('…');
            caret += 1;
        }
        line.extend(&chars[start..end]);
        if end < chars.len() {
            line.push('…');
        }
        format!("  {line}\n  {}^", " ".repeat(caret))
    }
}

impl From<FilterError> for Error {
    fn from(e: FilterError) -> Self {
        Error::invalid(format!(
            "invalid filter: {} (at position {})\n{}",
            e.message,
            e.position,
            e.excerpt()
        ))
    }
}

/// Parse a subscription filter. Empty or blank text is [`Filter::all`].
pub fn parse(src: &str) -> Result<Filter, FilterError> {
    parse_with_limit(src, MAX_FILTER_BYTES)
}

fn parse_with_limit(src: &str, max_bytes: usize) -> Result<Filter, FilterError> {
    let mut p = Parser { src, pos: 0 };
    if src.len() > max_bytes {
        let mut at = max_bytes;
        while !src.is_char_boundary(at) {
            at -= 1;
        }
        return Err(p.err(
            at,
            format!(
                "filter is {} bytes long; the maximum is {max_bytes} bytes",
                src.len()
            ),
        ));
    }
    p.skip_ws();
    if p.at_end() {
        return Ok(Filter::all());
    }
    let expr = p.expression()?;
    // `expression` stops only at end of input or at a `)`.
    if p.peek() == Some(')') {
        return Err(p.err(p.pos, "unbalanced `)`: there is no matching `(`"));
    }
    debug_assert!(p.at_end());
    Ok(Filter::from_expr(expr))
}

// ---------------------------------------------------------------------------
// Parser

const SYNTAX_HINT: &str =
    "expected a condition such as attributes:KEY, attributes.KEY = \"value\" or hasPrefix(attributes.KEY, \"prefix\")";
const QUOTE_KEY_HINT: &str = "an attribute key with characters other than ASCII letters, digits, `-` and `_` must be quoted, e.g. attributes.\"iana.org/language_tag\"";
const HAS_PREFIX_USAGE: &str = "hasPrefix takes 2 arguments: hasPrefix(attributes.KEY, \"prefix\")";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    And,
    Or,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::And => "AND",
            Op::Or => "OR",
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl<'a> Parser<'a> {
    fn err(&self, position: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            position,
            message: message.into(),
            filter: self.src.to_string(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek2(&self) -> Option<char> {
        let mut it = self.rest().chars();
        it.next();
        it.next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Skip white space; true if any was skipped.
    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        self.pos > start
    }

    /// The word (`[A-Za-z0-9_][A-Za-z0-9_-]*`) at the cursor, without consuming it.
    fn peek_word(&self) -> Option<&'a str> {
        let rest = self.rest();
        if !rest.chars().next().is_some_and(is_word_start) {
            return None;
        }
        let len = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
        Some(&rest[..len])
    }

    fn describe_next(&self) -> String {
        match self.peek() {
            None => "end of filter".to_string(),
            Some(_) => match self.peek_word() {
                Some(w) => format!("`{w}`"),
                None => format!("`{}`", self.peek().unwrap()),
            },
        }
    }

    /// `term {WS AND WS term}` or `term {WS OR WS term}`; stops before `)` or at the end.
    fn expression(&mut self) -> Result<Expr, FilterError> {
        let mut items = vec![self.term()?];
        let mut op: Option<Op> = None;
        loop {
            let had_ws = self.skip_ws();
            let at = self.pos;
            let Some(c) = self.peek() else { break };
            if c == ')' {
                break;
            }
            let next = match self.peek_word() {
                Some("AND") => Op::And,
                Some("OR") => Op::Or,
                Some(w @ ("and" | "or" | "And" | "Or")) => {
                    return Err(self.err(
                        at,
                        format!(
                            "boolean operators must be uppercase: write `{}` instead of `{w}`",
                            w.to_ascii_uppercase()
                        ),
                    ))
                }
                Some(w) => {
                    return Err(self.err(
                        at,
                        format!("unexpected `{w}` after a complete condition; join conditions with AND or OR"),
                    ))
                }
                None => {
                    let msg = match c {
                        '=' | '!' | ':' => format!(
                            "unexpected `{c}` after a complete condition; attributes:KEY only tests that a key exists, to compare its value write attributes.KEY = \"value\""
                        ),
                        _ => format!(
                            "unexpected `{c}` after a complete condition; expected AND, OR, `)` or the end of the filter"
                        ),
                    };
                    return Err(self.err(at, msg));
                }
            };
            if !had_ws {
                return Err(self.err(
                    at,
                    format!("{} must be preceded by white space", next.as_str()),
                ));
            }
            if let Some(prev) = op {
                if prev != next {
                    return Err(self.err(
                        at,
                        format!(
                            "AND and OR cannot be mixed without parentheses; group the conditions explicitly, e.g. `a {} (b {} c)`",
                            prev.as_str(),
                            next.as_str()
                        ),
                    ));
                }
            }
            op = Some(next);
            self.pos += next.as_str().len();
            let after = self.pos;
            if !self.skip_ws() {
                return Err(match self.peek() {
                    None => self.err(after, format!("missing operand after {}", next.as_str())),
                    Some(_) => self.err(
                        after,
                        format!("{} must be followed by white space", next.as_str()),
                    ),
                });
            }
            if matches!(self.peek(), None | Some(')')) {
                return Err(self.err(self.pos, format!("missing operand after {}", next.as_str())));
            }
            items.push(self.term()?);
        }
        Ok(match (items.len(), op) {
            (1, _) => items.pop().unwrap(),
            (_, Some(Op::And)) => Expr::And(items),
            _ => Expr::Or(items),
        })
    }

    /// `["NOT" WS | "-"] simple`
    fn term(&mut self) -> Result<Expr, FilterError> {
        let start = self.pos;
        if self.peek() == Some('-') {
            self.bump();
            match self.peek() {
                None | Some(')') => {
                    return Err(self.err(self.pos, "missing operand after `-`"));
                }
                Some(c) if c.is_whitespace() => {
                    return Err(self.err(
                        self.pos,
                        "`-` must be directly followed by the condition it negates (no space), or use NOT",
                    ));
                }
                _ => {}
            }
            self.reject_double_negation()?;
            return Ok(Expr::Not(Box::new(self.simple()?)));
        }
        if self.peek_word() == Some("NOT") {
            self.pos += 3;
            let after = self.pos;
            if !self.skip_ws() {
                return Err(match self.peek() {
                    None | Some(')') => self.err(after, "missing operand after NOT"),
                    Some(_) => self.err(after, "NOT must be followed by white space"),
                });
            }
            if matches!(self.peek(), None | Some(')')) {
                return Err(self.err(self.pos, "missing operand after NOT"));
            }
            self.reject_double_negation()?;
            return Ok(Expr::Not(Box::new(self.simple()?)));
        }
        debug_assert_eq!(start, self.pos);
        self.simple()
    }

    fn reject_double_negation(&self) -> Result<(), FilterError> {
        if self.peek() == Some('-') || self.peek_word() == Some("NOT") {
            return Err(self.err(
                self.pos,
                "a condition can be negated only once; to negate a negation use parentheses, e.g. NOT (NOT attributes:KEY)",
            ));
        }
        Ok(())
    }

    /// `"(" expression ")"` or a restriction.
    fn simple(&mut self) -> Result<Expr, FilterError> {
        let at = self.pos;
        let Some(c) = self.peek() else {
            return Err(self.err(at, format!("missing operand: {SYNTAX_HINT}")));
        };
        match c {
            '(' => {
                self.bump();
                self.skip_ws();
                match self.peek() {
                    Some(')') => {
                        return Err(self.err(self.pos, format!("empty parentheses: {SYNTAX_HINT}")))
                    }
                    None => {
                        return Err(self.err(
                            self.pos,
                            format!("missing operand after `(`: {SYNTAX_HINT}"),
                        ))
                    }
                    _ => {}
                }
                let e = self.expression()?;
                self.skip_ws();
                if self.peek() == Some(')') {
                    self.bump();
                    Ok(e)
                } else {
                    Err(self.err(self.pos, format!("missing `)` to close the `(` at position {at}")))
                }
            }
            ')' => Err(self.err(at, format!("missing operand before `)`: {SYNTAX_HINT}"))),
            '"' | '\'' => Err(self.err(
                at,
                "a condition must start with attributes or hasPrefix, not a string literal; write attributes.KEY = \"value\"",
            )),
            _ => {
                let Some(word) = self.peek_word() else {
                    return Err(self.err(at, format!("unexpected `{c}`: {SYNTAX_HINT}")));
                };
                match word {
                    "attributes" => {
                        self.pos += word.len();
                        self.attribute_restriction()
                    }
                    "hasPrefix" => {
                        self.pos += word.len();
                        self.has_prefix()
                    }
                    "AND" | "OR" => Err(self.err(at, format!("missing operand before {word}"))),
                    "NOT" => Err(self.err(at, "NOT must be followed by white space")),
                    "and" | "or" | "not" => Err(self.err(
                        at,
                        format!(
                            "boolean operators must be uppercase: write `{}` instead of `{word}`",
                            word.to_ascii_uppercase()
                        ),
                    )),
                    _ => Err(self.unknown_name(at, word)),
                }
            }
        }
    }

    /// Error for a word that is neither `attributes` nor `hasPrefix`.
    fn unknown_name(&self, at: usize, word: &str) -> FilterError {
        let next = self.src[at + word.len()..].chars().next();
        if next == Some('(') {
            let hint = if word.eq_ignore_ascii_case("hasprefix") {
                " (function names are case-sensitive)"
            } else {
                ""
            };
            self.err(
                at,
                format!(
                    "unknown function `{word}`: hasPrefix is the only supported function{hint}"
                ),
            )
        } else {
            let hint = if word.eq_ignore_ascii_case("attributes")
                || word.eq_ignore_ascii_case("attribute")
            {
                " (field names are case-sensitive: write `attributes`)"
            } else if word == "data" || word == "body" {
                " (filters can select on message attributes, not on message data)"
            } else {
                ""
            };
            self.err(
                at,
                format!("unknown field `{word}`: only `attributes` can be filtered on{hint}"),
            )
        }
    }

    /// After `attributes`: `:KEY` or `.KEY (=|!=) "value"`.
    fn attribute_restriction(&mut self) -> Result<Expr, FilterError> {
        if self.peek() == Some('.') {
            self.bump();
            let key_at = self.pos;
            let key = self.key()?;
            self.skip_ws();
            let op_at = self.pos;
            let ne = match (self.peek(), self.peek2()) {
                (Some('='), _) => {
                    self.bump();
                    false
                }
                (Some('!'), Some('=')) => {
                    self.pos += 2;
                    true
                }
                (Some(c @ ('<' | '>')), _) => {
                    let op = if self.peek2() == Some('=') { format!("{c}=") } else { c.to_string() };
                    return Err(self.err(
                        op_at,
                        format!("unsupported operator `{op}`: attribute values are compared with = and != only"),
                    ));
                }
                (Some(':'), _) => {
                    return Err(self.err(
                        op_at,
                        "`attributes.KEY:` is not supported; to test that a key exists write attributes:KEY",
                    ))
                }
                _ => {
                    let shown = &self.src[key_at..op_at].trim_end();
                    return Err(self.err(
                        op_at,
                        format!(
                            "expected `=` or `!=` after attributes.{shown}, found {}; to test that the key exists write attributes:{shown}",
                            self.describe_next()
                        ),
                    ));
                }
            };
            let op = if ne { "!=" } else { "=" };
            self.skip_ws();
            let value = self.value(op)?;
            Ok(if ne {
                Expr::Ne(key, value)
            } else {
                Expr::Eq(key, value)
            })
        } else {
            let had_ws = self.skip_ws();
            match self.peek() {
                Some(':') => {
                    self.bump();
                    self.skip_ws();
                    Ok(Expr::Has(self.key()?))
                }
                Some('.') if had_ws => {
                    Err(self.err(self.pos, "no white space is allowed before the `.` of attributes.KEY"))
                }
                _ => Err(self.err(
                    self.pos,
                    format!(
                        "expected `.KEY` or `:KEY` after `attributes`, found {}, e.g. attributes.KEY = \"value\" or attributes:KEY",
                        self.describe_next()
                    ),
                )),
            }
        }
    }

    /// The string literal on the right of `=`/`!=`.
    fn value(&mut self, op: &str) -> Result<String, FilterError> {
        let at = self.pos;
        match self.peek() {
            Some('"' | '\'') => self.string(),
            None => {
                Err(self.err(at, format!("missing value after `{op}`: expected a string literal such as \"value\"")))
            }
            Some(_) if self.peek_word() == Some("attributes") => Err(self.err(
                at,
                "cannot compare two attributes: the value on the right must be a string literal such as \"value\"",
            )),
            Some(_) => Err(self.err(
                at,
                format!(
                    "the value must be a string literal in quotes, found {}; write e.g. attributes.KEY {op} \"value\"",
                    self.describe_next()
                ),
            )),
        }
    }

    /// An attribute key: bare (`[A-Za-z0-9_-]+`) or a string literal.
    fn key(&mut self) -> Result<String, FilterError> {
        let at = self.pos;
        match self.peek() {
            Some('"' | '\'') => {
                let k = self.string()?;
                if k.is_empty() {
                    return Err(self.err(at, "attribute key must not be empty"));
                }
                Ok(k)
            }
            Some(c) if is_word_char(c) => {
                while self.peek().is_some_and(is_word_char) {
                    self.bump();
                }
                let key = self.src[at..self.pos].to_string();
                // A bare key ends at white space or punctuation of the grammar; anything
                // else (`.`, `/`, non-ASCII, `\`) means the key needed quotes.
                match self.peek() {
                    Some(c) if !c.is_whitespace() && !matches!(c, '(' | ')' | '=' | '!' | ',' | ':' | '<' | '>') => {
                        Err(self.err(self.pos, format!("unexpected `{c}` in attribute key: {QUOTE_KEY_HINT}")))
                    }
                    _ => Ok(key),
                }
            }
            None => Err(self.err(at, "missing attribute key")),
            Some('\\') => Err(self.err(
                at,
                "escape sequences are only allowed inside a string literal: quote the key, e.g. attributes:\"\\u307F\"",
            )),
            Some(c) if c.is_whitespace() => {
                Err(self.err(at, "no white space is allowed after the `.` of attributes.KEY"))
            }
            Some(c) => {
                Err(self.err(at, format!("unexpected `{c}` where an attribute key was expected: {QUOTE_KEY_HINT}")))
            }
        }
    }

    /// After `hasPrefix`: `(attributes.KEY, "prefix")`.
    fn has_prefix(&mut self) -> Result<Expr, FilterError> {
        match self.peek() {
            Some('(') => {
                self.bump();
            }
            Some(c) if c.is_whitespace() => {
                return Err(self.err(
                    self.pos,
                    "no white space is allowed between hasPrefix and `(`",
                ))
            }
            _ => {
                return Err(self.err(
                    self.pos,
                    format!(
                        "expected `(` after hasPrefix, found {}: {HAS_PREFIX_USAGE}",
                        self.describe_next()
                    ),
                ))
            }
        }
        self.skip_ws();
        let at = self.pos;
        match self.peek_word() {
            Some("attributes") => {
                self.pos += "attributes".len();
                if self.peek() != Some('.') {
                    return Err(self.err(
                        self.pos,
                        format!(
                            "the first argument of hasPrefix must be attributes.KEY, found {} after `attributes`",
                            self.describe_next()
                        ),
                    ));
                }
                self.bump();
            }
            Some(w) => return Err(self.unknown_name(at, w)),
            None => {
                let msg = match self.peek() {
                    Some(')') | None => HAS_PREFIX_USAGE.to_string(),
                    _ => format!(
                        "the first argument of hasPrefix must be attributes.KEY, found {}",
                        self.describe_next()
                    ),
                };
                return Err(self.err(at, msg));
            }
        }
        let key = self.key()?;
        self.skip_ws();
        match self.peek() {
            Some(',') => {
                self.bump();
            }
            Some(')') => return Err(self.err(self.pos, HAS_PREFIX_USAGE)),
            _ => {
                return Err(self.err(
                    self.pos,
                    format!(
                        "expected `,` after the first argument of hasPrefix, found {}",
                        self.describe_next()
                    ),
                ))
            }
        }
        self.skip_ws();
        let prefix = match self.peek() {
            Some('"' | '\'') => self.string()?,
            Some(')') | None => return Err(self.err(self.pos, HAS_PREFIX_USAGE)),
            _ => {
                return Err(self.err(
                    self.pos,
                    format!(
                        "the second argument of hasPrefix must be a string literal such as \"prefix\", found {}",
                        self.describe_next()
                    ),
                ))
            }
        };
        self.skip_ws();
        match self.peek() {
            Some(')') => {
                self.bump();
                Ok(Expr::HasPrefix(key, prefix))
            }
            Some(',') => Err(self.err(self.pos, HAS_PREFIX_USAGE)),
            None => Err(self.err(self.pos, "missing `)` to close hasPrefix(")),
            _ => Err(self.err(
                self.pos,
                format!(
                    "expected `)` after the arguments of hasPrefix, found {}",
                    self.describe_next()
                ),
            )),
        }
    }

    /// A string literal in `"` or `'` with CEL escapes; the cursor is on the quote.
    fn string(&mut self) -> Result<String, FilterError> {
        let open = self.pos;
        let quote = self.bump().expect("caller checked the quote");
        let mut out = String::new();
        loop {
            let Some(c) = self.bump() else {
                return Err(self.err(
                    open,
                    format!("unterminated string literal: missing closing `{quote}`"),
                ));
            };
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let esc = self.pos - 1;
            let Some(e) = self.bump() else {
                return Err(self.err(
                    open,
                    format!("unterminated string literal: missing closing `{quote}`"),
                ));
            };
            let decoded = match e {
                'a' => '\u{07}',
                'b' => '\u{08}',
                'f' => '\u{0c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'v' => '\u{0b}',
                '\\' | '\'' | '"' | '`' | '?' => e,
                'x' | 'X' => self.hex_escape(esc, e, 2)?,
                'u' => self.hex_escape(esc, e, 4)?,
                'U' => self.hex_escape(esc, e, 8)?,
                '0'..='3' => {
                    let digits: String = self.rest().chars().take(2).collect();
                    if digits.len() != 2 || !digits.chars().all(|d| ('0'..='7').contains(&d)) {
                        return Err(self.err(
                            esc,
                            "an octal escape needs exactly 3 octal digits, from \\000 to \\377",
                        ));
                    }
                    self.pos += 2;
                    let v = u32::from_str_radix(&format!("{e}{digits}"), 8).expect("octal digits");
                    char::from_u32(v).expect("<= 0o377 is a char")
                }
                other => {
                    return Err(self.err(
                        esc,
                        format!(
                            "invalid escape sequence `\\{other}`; valid escapes are \\\\ \\\" \\' \\` \\? \\a \\b \\f \\n \\r \\t \\v \\xHH \\uHHHH \\UHHHHHHHH and \\ooo (octal)"
                        ),
                    ))
                }
            };
            out.push(decoded);
        }
    }

    fn hex_escape(&mut self, esc: usize, kind: char, n: usize) -> Result<char, FilterError> {
        let digits: String = self.rest().chars().take(n).collect();
        if digits.chars().count() != n || !digits.chars().all(|d| d.is_ascii_hexdigit()) {
            return Err(self.err(
                esc,
                format!("`\\{kind}` must be followed by exactly {n} hex digits"),
            ));
        }
        self.pos += n;
        let v = u32::from_str_radix(&digits, 16).expect("hex digits");
        char::from_u32(v).ok_or_else(|| {
            self.err(esc, format!("`\\{kind}{digits}` is not a Unicode scalar value (surrogate or above U+10FFFF)"))
        })
    }
}

// ---------------------------------------------------------------------------
// Printing: canonical syntax that `parse` maps back to the same tree.

fn write_key(f: &mut fmt::Formatter<'_>, key: &str) -> fmt::Result {
    let bare = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(is_word_char);
    if bare {
        f.write_str(key)
    } else {
        write_string(f, key)
    }
}

fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            '\u{07}' => f.write_str("\\a")?,
            '\u{08}' => f.write_str("\\b")?,
            '\u{0b}' => f.write_str("\\v")?,
            '\u{0c}' => f.write_str("\\f")?,
            c if c.is_control() && (c as u32) < 0x100 => write!(f, "\\x{:02X}", c as u32)?,
            c if c.is_control() => write!(f, "\\u{:04X}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn child(f: &mut fmt::Formatter<'_>, e: &Expr, paren_not: bool) -> fmt::Result {
            let paren = match e {
                Expr::And(v) | Expr::Or(v) => v.len() != 1,
                Expr::Not(_) => paren_not,
                _ => false,
            };
            if paren {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        }
        match self {
            Expr::Has(k) => {
                f.write_str("attributes:")?;
                write_key(f, k)
            }
            Expr::Eq(k, v) | Expr::Ne(k, v) => {
                f.write_str("attributes.")?;
                write_key(f, k)?;
                f.write_str(if matches!(self, Expr::Eq(..)) {
                    " = "
                } else {
                    " != "
                })?;
                write_string(f, v)
            }
            Expr::HasPrefix(k, p) => {
                f.write_str("hasPrefix(attributes.")?;
                write_key(f, k)?;
                f.write_str(", ")?;
                write_string(f, p)?;
                f.write_str(")")
            }
            Expr::Not(e) => {
                f.write_str("NOT ")?;
                child(f, e, true)
            }
            Expr::And(es) | Expr::Or(es) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    child(f, e, false)?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Filter {
    /// Canonical filter syntax; the empty filter prints as the empty string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.expr {
            None => Ok(()),
            Some(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn has(k: &str) -> Expr {
        Expr::Has(k.into())
    }
    fn eq(k: &str, v: &str) -> Expr {
        Expr::Eq(k.into(), v.into())
    }
    fn ne(k: &str, v: &str) -> Expr {
        Expr::Ne(k.into(), v.into())
    }
    fn pre(k: &str, v: &str) -> Expr {
        Expr::HasPrefix(k.into(), v.into())
    }
    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    fn ast(src: &str) -> Expr {
        parse(src)
            .unwrap_or_else(|e| panic!("{src:?}: {e}"))
            .into_expr()
            .expect("non-empty")
    }

    #[track_caller]
    fn bad(src: &str, position: usize, needle: &str) {
        match parse(src) {
            Ok(f) => panic!(
                "{src:?} parsed as {f:?}, expected an error at {position} containing {needle:?}"
            ),
            Err(e) => {
                assert!(
                    e.message.contains(needle),
                    "{src:?}: message {:?} does not contain {needle:?}",
                    e.message
                );
                assert_eq!(
                    e.position, position,
                    "{src:?}: wrong position for {:?}",
                    e.message
                );
                assert_eq!(e.filter, src);
            }
        }
    }

    /// A message set like the one in Google's docs: name/lang/a non-ASCII key.
    fn corpus() -> Vec<BTreeMap<String, String>> {
        vec![
            attrs(&[("name", "com"), ("lang", "en")]), // 0
            attrs(&[("name", "net"), ("lang", "en")]), // 1
            attrs(&[("name", "org"), ("lang", "cn")]), // 2
            attrs(&[("name", "co"), ("lang", "jp")]),  // 3
            attrs(&[("lang", "jp")]),                  // 4
            attrs(&[("name", "com")]),                 // 5
            attrs(&[("\u{307F}\u{3093}\u{306A}", "x"), ("lang", "jp")]), // 6
            attrs(&[("iana.org/language_tag", "en"), ("name", "com")]), // 7
            attrs(&[("iana.org/language_tag", "de"), ("name", "net")]), // 8
            attrs(&[]),                                // 9
        ]
    }

    #[track_caller]
    fn selects(src: &str, want: &[usize]) {
        let f = parse(src).unwrap_or_else(|e| panic!("{src:?}: {e}"));
        let got: Vec<usize> = corpus()
            .iter()
            .enumerate()
            .filter(|(_, a)| f.matches(a))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(got, want, "{src:?}");
    }

    // -- the examples on Google's page, with the meaning its tables give --

    #[test]
    fn filter_doc_table_examples() {
        // "Messages with the name attribute"
        selects("attributes:name", &[0, 1, 2, 3, 5, 7, 8]);
        // "Messages without the name attribute"
        selects("NOT attributes:name", &[4, 6, 9]);
        // "Messages with the name attribute and the value of com"
        selects("attributes.name = \"com\"", &[0, 5, 7]);
        // "Messages without the name attribute and the value of com": a missing key matches.
        selects("attributes.name != \"com\"", &[1, 2, 3, 4, 6, 8, 9]);
        // "Messages with the name attribute and a value that starts with co"
        selects("hasPrefix(attributes.name, \"co\")", &[0, 3, 5, 7]);
        // "Messages without the name attribute and a value that starts with co"
        selects(
            "NOT hasPrefix(attributes.name, \"co\")",
            &[1, 2, 4, 6, 8, 9],
        );
    }

    #[test]
    fn filter_doc_syntax_examples() {
        assert_eq!(ast("attributes.name = \"com\""), eq("name", "com"));
        assert_eq!(
            ast("attributes.\"iana.org/language_tag\" = \"en\""),
            eq("iana.org/language_tag", "en")
        );
        assert_eq!(
            ast("attributes:\"\\u307F\\u3093\\u306A\""),
            has("\u{307F}\u{3093}\u{306A}")
        );
        selects("attributes:\"\\u307F\\u3093\\u306A\"", &[6]);
        let e = ast("attributes:\"iana.org/language_tag\" AND NOT attributes.name = \"com\"");
        assert_eq!(
            e,
            Expr::And(vec![has("iana.org/language_tag"), not(eq("name", "com"))])
        );
        selects(
            "attributes:\"iana.org/language_tag\" AND NOT attributes.name = \"com\"",
            &[8],
        );
        selects(
            "attributes:\"iana.org/language_tag\" AND (attributes.name = \"net\" OR attributes.name = \"org\")",
            &[8],
        );
        let minus = ast("attributes.name = \"com\" AND -attributes:\"iana.org/language_tag\"");
        assert_eq!(
            minus,
            Expr::And(vec![eq("name", "com"), not(has("iana.org/language_tag"))])
        );
        selects(
            "attributes.name = \"com\" AND -attributes:\"iana.org/language_tag\"",
            &[0, 5],
        );
        // Client-library samples use no spaces around `=`; the C++ sample uses a dash in the key.
        assert_eq!(
            ast("attributes.author=\"unknown\""),
            eq("author", "unknown")
        );
        assert_eq!(
            ast("attributes.is-even = \"false\""),
            eq("is-even", "false")
        );
        assert_eq!(
            ast("attributes.ce-type=\"dev.chainguard.bar\" AND hasPrefix(attributes.ce-source, \"baz/\")"),
            Expr::And(vec![eq("ce-type", "dev.chainguard.bar"), pre("ce-source", "baz/")])
        );
    }

    #[test]
    fn filter_doc_invalid_examples() {
        // "Invalid: The left-hand side of the filter is a value"
        bad("\"com\" = attributes.name", 0, "not a string literal");
        // "Invalid: Filter compares two keys"
        bad(
            "attributes.name = attributes.website",
            18,
            "cannot compare two attributes",
        );
        // "Invalid: Filter escapes characters without a string literal"
        bad(
            "attributes:\\u307F\\u3093\\u306A",
            11,
            "only allowed inside a string literal",
        );
        bad("attributes:\u{307F}\u{3093}\u{306A}", 11, "must be quoted");
        // "Invalid: AND and OR operators without parentheses"
        bad(
            "attributes:\"iana.org/language_tag\" AND attributes.name = \"net\" OR attributes.name = \"org\"",
            63,
            "cannot be mixed",
        );
        // "Invalid: AND and OR operators combine incomplete expressions"
        bad(
            "attributes.name = \"com\" AND (\"net\" OR \"org\")",
            29,
            "not a string literal",
        );
    }

    // -- tricky but valid --

    #[test]
    fn filter_empty_matches_everything() {
        for src in ["", "   ", "\n\t "] {
            let f = parse(src).unwrap();
            assert!(f.is_all());
            assert_eq!(f, Filter::all());
            assert!(f.matches(&attrs(&[])));
            assert!(f.matches(&attrs(&[("a", "b")])));
            assert_eq!(f.to_string(), "");
        }
    }

    #[test]
    fn filter_whitespace_and_quotes() {
        assert_eq!(ast("  attributes:k  "), has("k"));
        assert_eq!(ast("attributes : k"), has("k"));
        assert_eq!(ast("attributes.k   !=\t'v'"), ne("k", "v"));
        assert_eq!(ast("hasPrefix( attributes.k ,\"p\" )"), pre("k", "p"));
        assert_eq!(ast("( attributes:a )"), has("a"));
        assert_eq!(
            ast("attributes.'my key' = 'it''s'"
                .replace("''", "\\'")
                .as_str()),
            eq("my key", "it's")
        );
        assert_eq!(ast("attributes.AND = \"OR\""), eq("AND", "OR"));
        assert_eq!(ast("attributes:NOT"), has("NOT"));
        assert_eq!(ast("attributes:123"), has("123"));
        assert_eq!(ast("attributes:_a-b_c"), has("_a-b_c"));
        assert_eq!(ast("attributes.k = \"\""), eq("k", ""));
        assert_eq!(ast("hasPrefix(attributes.\"a.b\", \"\")"), pre("a.b", ""));
        assert_eq!(
            ast("attributes:a\nAND\nattributes:b"),
            Expr::And(vec![has("a"), has("b")])
        );
    }

    #[test]
    fn filter_escapes() {
        let cases = [
            (r#""a\"b""#, "a\"b"),
            (r#"'a\'b'"#, "a'b"),
            (r#""it's""#, "it's"),
            (r#"'say "hi"'"#, "say \"hi\""),
            (r#""back\\slash""#, "back\\slash"),
            (r#""\a\b\f\n\r\t\v\?\`""#, "\u{7}\u{8}\u{c}\n\r\t\u{b}?`"),
            (r#""\x41\X42""#, "AB"),
            (r#""\u00e9\U0001F600""#, "é😀"),
            (r#""\101\377""#, "Aÿ"),
            (r#""\303\277""#, "Ã¿"), // octal and hex escapes are code points, as in CEL
            (r#""raw é 😀""#, "raw é 😀"),
        ];
        for (lit, want) in cases {
            let src = format!("attributes.k = {lit}");
            assert_eq!(ast(&src), eq("k", want), "{src}");
        }
    }

    #[test]
    fn filter_precedence_and_grouping() {
        // NOT binds tightest.
        assert_eq!(
            ast("NOT attributes:a AND attributes:b"),
            Expr::And(vec![not(has("a")), has("b")])
        );
        assert_eq!(
            ast("-attributes:a OR attributes:b"),
            Expr::Or(vec![not(has("a")), has("b")])
        );
        assert_eq!(
            ast("NOT (attributes:a AND attributes:b)"),
            not(Expr::And(vec![has("a"), has("b")]))
        );
        assert_eq!(ast("NOT (NOT attributes:a)"), not(not(has("a"))));
        assert_eq!(ast("-(-attributes:a)"), not(not(has("a"))));
        // Chains of one operator are n-ary; explicit grouping is kept.
        assert_eq!(
            ast("attributes:a OR attributes:b OR attributes:c"),
            Expr::Or(vec![has("a"), has("b"), has("c")])
        );
        assert_eq!(
            ast("(attributes:a AND attributes:b) AND attributes:c"),
            Expr::And(vec![Expr::And(vec![has("a"), has("b")]), has("c")])
        );
        assert_eq!(
            ast("((attributes:a OR (attributes:b)) AND ((attributes:c)))"),
            Expr::And(vec![Expr::Or(vec![has("a"), has("b")]), has("c")])
        );
        let deep = format!("{}attributes:a{}", "(".repeat(100), ")".repeat(100));
        assert_eq!(ast(&deep), has("a"));
        // Mixed operators are fine once grouped.
        let e = ast("attributes:a AND (attributes:b OR attributes:c) AND NOT attributes:d");
        assert_eq!(
            e,
            Expr::And(vec![
                has("a"),
                Expr::Or(vec![has("b"), has("c")]),
                not(has("d"))
            ])
        );
        let f = Filter::from_expr(e);
        assert!(f.matches(&attrs(&[("a", ""), ("c", "")])));
        assert!(!f.matches(&attrs(&[("a", ""), ("c", ""), ("d", "")])));
        assert!(!f.matches(&attrs(&[("a", "")])));
    }

    #[test]
    fn filter_missing_key_semantics() {
        let missing = attrs(&[("other", "v")]);
        assert!(!parse("attributes:k").unwrap().matches(&missing));
        assert!(!parse("attributes.k = \"v\"").unwrap().matches(&missing));
        assert!(parse("attributes.k != \"v\"").unwrap().matches(&missing));
        assert!(!parse("hasPrefix(attributes.k, \"\")")
            .unwrap()
            .matches(&missing));
        assert!(parse("NOT hasPrefix(attributes.k, \"v\")")
            .unwrap()
            .matches(&missing));
        // `!=` is exactly NOT `=`.
        let present = attrs(&[("k", "v")]);
        assert!(!parse("attributes.k != \"v\"").unwrap().matches(&present));
        assert!(parse("attributes.k != \"w\"").unwrap().matches(&present));
        assert!(parse("hasPrefix(attributes.k, \"\")")
            .unwrap()
            .matches(&present));
        // Case-sensitive keys and values.
        assert!(!parse("attributes.K = \"v\"").unwrap().matches(&present));
        assert!(!parse("attributes.k = \"V\"").unwrap().matches(&present));
    }

    // -- errors, each with its position --

    /// Filters that do not parse: (filter, the error's position, a piece of its message).
    #[rustfmt::skip]
    const BAD_FILTERS: &[(&str, usize, &str)] = &[
        // unterminated strings: position of the opening quote
        ("attributes.k = \"abc", 15, "unterminated string literal"),
        ("attributes.k = 'abc\\'", 15, "unterminated string literal"),
        ("attributes:\"k", 11, "unterminated string literal"),
        // bad escapes: position of the backslash
        ("attributes.k = \"a\\qb\"", 17, "invalid escape sequence `\\q`"),
        ("attributes.k = \"\\u12\"", 16, "exactly 4 hex digits"),
        ("attributes.k = \"\\xZZ\"", 16, "exactly 2 hex digits"),
        ("attributes.k = \"\\uD800\"", 16, "not a Unicode scalar value"),
        ("attributes.k = \"\\U00110000\"", 16, "not a Unicode scalar value"),
        ("attributes.k = \"\\400\"", 16, "invalid escape sequence"),
        ("attributes.k = \"\\08\"", 16, "3 octal digits"),
        // unknown functions and fields
        ("hasSuffix(attributes.k, \"x\")", 0, "unknown function `hasSuffix`"),
        ("hasprefix(attributes.k, \"x\")", 0, "case-sensitive"),
        ("attributes:a AND matches(attributes.k, \"x\")", 17, "unknown function `matches`"),
        ("data.k = \"v\"", 0, "unknown field `data`"),
        ("Attributes.k = \"v\"", 0, "unknown field `Attributes`"),
        ("attribute:k", 0, "unknown field `attribute`"),
        ("hasPrefix(data.k, \"x\")", 10, "unknown field `data`"),
        ("name = \"v\"", 0, "only `attributes` can be filtered on"),
        // missing operands
        ("attributes:a AND", 16, "missing operand after AND"),
        ("attributes:a AND ", 17, "missing operand after AND"),
        ("attributes:a OR )", 16, "missing operand after OR"),
        ("AND attributes:a", 0, "missing operand before AND"),
        ("NOT", 3, "missing operand after NOT"),
        ("NOT ", 4, "missing operand after NOT"),
        ("-", 1, "missing operand after `-`"),
        ("()", 1, "empty parentheses"),
        ("(", 1, "missing operand after `(`"),
        ("attributes:a AND ()", 18, "empty parentheses"),
        ("attributes.k =", 14, "missing value after `=`"),
        ("attributes.k != ", 16, "missing value after `!=`"),
        ("attributes:", 11, "missing attribute key"),
        ("attributes.", 11, "missing attribute key"),
        ("attributes", 10, "expected `.KEY` or `:KEY`"),
        ("attributes = \"v\"", 11, "expected `.KEY` or `:KEY`"),
        ("attributes.k", 12, "expected `=` or `!=` after attributes.k"),
        ("attributes.k AND attributes:b", 13, "to test that the key exists write attributes:k"),
        // trailing input
        ("attributes:a attributes:b", 13, "join conditions with AND or OR"),
        ("attributes:a)", 12, "unbalanced `)`"),
        ("(attributes:a", 13, "missing `)` to close the `(` at position 0"),
        ("attributes:a = \"v\"", 13, "to compare its value write attributes.KEY"),
        ("attributes.k = \"v\" \"w\"", 19, "unexpected `\"`"),
        ("attributes:a -attributes:b", 13, "unexpected `-`"),
        // mixed AND/OR: position of the operator that switches
        ("attributes:a AND attributes:b OR attributes:c", 30, "AND and OR cannot be mixed"),
        ("attributes:a OR attributes:b AND attributes:c", 29, "AND and OR cannot be mixed"),
        ("(attributes:a OR attributes:b OR attributes:c AND attributes:d)", 46, "cannot be mixed"),
        // operator spelling
        ("attributes:a and attributes:b", 13, "write `AND` instead of `and`"),
        ("attributes:a Or attributes:b", 13, "write `OR` instead of `Or`"),
        ("not attributes:a", 0, "write `NOT` instead of `not`"),
        ("attributes:a AND(attributes:b)", 16, "AND must be followed by white space"),
        ("(attributes:a)AND attributes:b", 14, "AND must be preceded by white space"),
        ("NOT(attributes:a)", 3, "NOT must be followed by white space"),
        ("- attributes:a", 1, "no space"),
        ("NOT NOT attributes:a", 4, "negated only once"),
        ("NOT -attributes:a", 4, "negated only once"),
        ("--attributes:a", 1, "negated only once"),
        // keys and values
        ("attributes.iana.org/language_tag = \"en\"", 15, "must be quoted"),
        ("attributes:a/b", 12, "must be quoted"),
        ("attributes.\"\" = \"v\"", 11, "must not be empty"),
        ("attributes. k = \"v\"", 11, "no white space is allowed after the `.`"),
        ("attributes .k = \"v\"", 11, "no white space is allowed before the `.`"),
        ("attributes.k = v", 15, "must be a string literal in quotes"),
        ("attributes.k = 1", 15, "must be a string literal in quotes"),
        ("attributes.k < \"v\"", 13, "unsupported operator `<`"),
        ("attributes.k >= \"v\"", 13, "unsupported operator `>=`"),
        ("attributes.k:\"v\"", 12, "to test that a key exists write attributes:KEY"),
        ("attributes.k == \"v\"", 14, "must be a string literal"),
        // hasPrefix shape
        ("hasPrefix (attributes.k, \"p\")", 9, "between hasPrefix and `(`"),
        ("hasPrefix", 9, "expected `(` after hasPrefix"),
        ("hasPrefix()", 10, "hasPrefix takes 2 arguments"),
        ("hasPrefix(attributes.k)", 22, "hasPrefix takes 2 arguments"),
        ("hasPrefix(attributes.k, )", 24, "hasPrefix takes 2 arguments"),
        ("hasPrefix(attributes.k, \"p\", \"q\")", 27, "hasPrefix takes 2 arguments"),
        ("hasPrefix(attributes.k, \"p\"", 27, "missing `)` to close hasPrefix("),
        ("hasPrefix(attributes:k, \"p\")", 20, "must be attributes.KEY"),
        ("hasPrefix(\"p\", attributes.k)", 10, "must be attributes.KEY"),
        ("hasPrefix(attributes.k, attributes.j)", 24, "must be a string literal"),
        ("hasPrefix(attributes.k \"p\")", 23, "expected `,`"),
        // stray characters
        ("attributes:a AND !attributes:b", 17, "unexpected `!`"),
        ("é", 0, "unexpected `é`"),
    ];

    #[test]
    fn filter_errors_have_positions() {
        for &(src, position, needle) in BAD_FILTERS {
            bad(src, position, needle);
        }
    }

    #[test]
    fn filter_length_limit() {
        let key = "k".repeat(MAX_FILTER_BYTES - "attributes:".len());
        let ok = format!("attributes:{key}");
        assert_eq!(ok.len(), MAX_FILTER_BYTES);
        assert_eq!(ast(&ok), has(&key));
        let long = format!("{ok}k");
        bad(
            &long,
            MAX_FILTER_BYTES,
            "257 bytes long; the maximum is 256 bytes",
        );
        // White space counts too; the position stays on a char boundary.
        bad(&" ".repeat(300), 256, "300 bytes long");
        let multibyte = format!("attributes.k = \"{}\"", "é".repeat(130));
        let e = parse(&multibyte).unwrap_err();
        assert!(multibyte.is_char_boundary(e.position) && e.position <= MAX_FILTER_BYTES);
    }

    #[test]
    fn filter_error_display_and_conversion() {
        let e = parse("attributes:a AND").unwrap_err();
        assert_eq!(
            e.to_string(),
            "filter error at position 16: missing operand after AND"
        );
        assert_eq!(e.excerpt(), "  attributes:a AND\n                  ^");
        let err: Error = e.into();
        assert_eq!(err.code, Code::InvalidArgument);
        assert_eq!(
            err.message,
            "invalid filter: missing operand after AND (at position 16)\n  attributes:a AND\n                  ^"
        );
        // The caret counts characters, not bytes, and control characters become spaces.
        let e = parse("attributes.\"é\"\n= v").unwrap_err();
        assert_eq!(e.position, 18);
        assert_eq!(e.excerpt(), "  attributes.\"é\" = v\n                   ^");
        // Long filters are windowed around the error.
        let src = "attributes:d AND ".repeat(8) + "attributes:a AND attributes:b OR attributes:c";
        let e = parse(&src).unwrap_err();
        assert_eq!(e.position, 17 * 8 + 30);
        let ex = e.excerpt();
        let lines: Vec<&str> = ex.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("  …") && lines[0].chars().count() <= 2 + 72 + 2,
            "{ex}"
        );
        let caret = lines[1].chars().count() - 1;
        assert_eq!(lines[0].chars().nth(caret), Some('O'), "{ex}");
    }

    #[test]
    fn filter_display_is_canonical() {
        let cases = [
            ("attributes:k", "attributes:k"),
            ("attributes : \"k\"", "attributes:k"),
            ("attributes.\"my key\"='v'", "attributes.\"my key\" = \"v\""),
            ("attributes:\"1st\"", "attributes:\"1st\""),
            ("attributes:1st", "attributes:\"1st\""),
            (
                "attributes.k != \"a\\\"b\\\\c\\n\\x01\"",
                "attributes.k != \"a\\\"b\\\\c\\n\\x01\"",
            ),
            ("-attributes:k", "NOT attributes:k"),
            ("NOT (NOT attributes:k)", "NOT (NOT attributes:k)"),
            (
                "NOT ((attributes:a) OR attributes:b)",
                "NOT (attributes:a OR attributes:b)",
            ),
            (
                "hasPrefix( attributes.k,'p' )",
                "hasPrefix(attributes.k, \"p\")",
            ),
            (
                "(attributes:a AND attributes:b) AND attributes:c",
                "(attributes:a AND attributes:b) AND attributes:c",
            ),
        ];
        for (src, want) in cases {
            let f = parse(src).unwrap();
            assert_eq!(f.to_string(), want, "{src}");
            assert_eq!(parse(&f.to_string()).unwrap(), f, "{src}");
        }
        assert_eq!(
            "attributes:k".parse::<Filter>().unwrap(),
            Filter::from_expr(has("k"))
        );
    }

    // -- deterministic random round trip: AST -> text -> AST, same matches --

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len())]
        }
    }

    const KEYS: &[&str] = &[
        "a",
        "b",
        "name",
        "ce-type",
        "_x",
        "AND",
        "NOT",
        "1st",
        "-dash",
        "iana.org/language_tag",
        "my key",
        "é",
        "q\"uote",
        "back\\slash",
        "tab\tnl\n",
    ];
    const VALUES: &[&str] = &[
        "",
        "v",
        "va",
        "val",
        "com",
        "co",
        "x y",
        "\"",
        "\\",
        "é😀",
        "\u{1}\u{7f}",
        "'",
    ];

    fn random_expr(rng: &mut Rng, depth: usize) -> Expr {
        let leaf = depth == 0 || rng.below(3) == 0;
        if leaf {
            let k = rng.pick(KEYS).to_string();
            let v = rng.pick(VALUES).to_string();
            return match rng.below(4) {
                0 => Expr::Has(k),
                1 => Expr::Eq(k, v),
                2 => Expr::Ne(k, v),
                _ => Expr::HasPrefix(k, v),
            };
        }
        match rng.below(3) {
            0 => Expr::Not(Box::new(random_expr(rng, depth - 1))),
            n => {
                let children = (0..2 + rng.below(2))
                    .map(|_| random_expr(rng, depth - 1))
                    .collect();
                if n == 1 {
                    Expr::And(children)
                } else {
                    Expr::Or(children)
                }
            }
        }
    }

    fn random_attrs(rng: &mut Rng) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for _ in 0..rng.below(6) {
            m.insert(rng.pick(KEYS).to_string(), rng.pick(VALUES).to_string());
        }
        m
    }

    #[test]
    fn filter_random_roundtrip() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut within_limit, mut over_limit) = (0, 0);
        for _ in 0..3000 {
            let expr = random_expr(&mut rng, 4);
            let filter = Filter::from_expr(expr);
            let text = filter.to_string();
            let reparsed = parse_with_limit(&text, usize::MAX)
                .unwrap_or_else(|e| panic!("printed filter does not parse: {text:?}: {e}"));
            assert_eq!(reparsed, filter, "{text}");
            for _ in 0..8 {
                let a = random_attrs(&mut rng);
                assert_eq!(reparsed.matches(&a), filter.matches(&a), "{text} on {a:?}");
            }
            // The public parser agrees, or rejects only for length.
            match parse(&text) {
                Ok(f) => {
                    within_limit += 1;
                    assert_eq!(f, filter);
                }
                Err(e) => {
                    over_limit += 1;
                    assert!(
                        text.len() > MAX_FILTER_BYTES && e.message.contains("maximum is 256"),
                        "{e}"
                    );
                }
            }
        }
        eprintln!("random roundtrip: {within_limit} within the limit, {over_limit} over");
        assert!(
            within_limit > 500 && over_limit > 0,
            "{within_limit} / {over_limit}"
        );
    }

    /// Mutated filter text never panics; errors point inside the text at a char
    /// boundary; whatever parses prints back to something that parses the same.
    #[test]
    fn filter_random_mutations() {
        const PIECES: &[&str] = &[
            "attributes",
            ".",
            ":",
            "=",
            "!=",
            "\"",
            "'",
            "\\",
            "(",
            ")",
            " ",
            "AND",
            "OR",
            "NOT",
            "-",
            ",",
            "hasPrefix(",
            "k",
            "é",
            "\\u00e9",
            "\\x4",
            "\n",
        ];
        let mut rng = Rng(42);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let base = Filter::from_expr(random_expr(&mut rng, 2)).to_string();
            let mut s = base.clone();
            for _ in 0..1 + rng.below(3) {
                let mut at = rng.below(s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.below(3) {
                    0 => s.insert_str(at, rng.pick(PIECES)),
                    1 if at < s.len() => {
                        let c = s[at..].chars().next().unwrap();
                        s.replace_range(at..at + c.len_utf8(), "");
                    }
                    _ => s.truncate(at),
                }
            }
            match parse_with_limit(&s, usize::MAX) {
                Ok(f) => {
                    parsed += 1;
                    let again = parse_with_limit(&f.to_string(), usize::MAX).unwrap();
                    assert_eq!(again, f, "{s:?}");
                }
                Err(e) => {
                    assert!(
                        e.position <= s.len() && s.is_char_boundary(e.position),
                        "{s:?}: {e}"
                    );
                    assert!(!e.message.is_empty());
                    let _ = e.excerpt();
                }
            }
        }
        eprintln!("random mutations: {parsed} of 20000 still parse");
        assert!(parsed > 100, "{parsed}");
    }
}
