//! Errors in a cluster file or profile that name the file, the line and the fix.
//!
//! serde reports type errors and unknown keys with a byte span; validation errors found after
//! parsing carry a key path (`node[2].network.eth0.address`) that is looked up in a span-keeping
//! parse of the same text, so both kinds read `cluster.toml:14:11: …`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One step of a key path into a TOML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path such as `["node", 2, "network", "eth0", "address"]`.
pub type KeyPath = Vec<Seg>;

/// Builds a key path from `"node"`, `2usize`, … without spelling out `Seg` each time.
#[macro_export]
macro_rules! keypath {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::plan::diag::IntoSeg::into_seg($seg)),*]
    };
}

pub trait IntoSeg {
    fn into_seg(self) -> Seg;
}
impl IntoSeg for &str {
    fn into_seg(self) -> Seg {
        Seg::Key(self.to_string())
    }
}
impl IntoSeg for String {
    fn into_seg(self) -> Seg {
        Seg::Key(self)
    }
}
impl IntoSeg for &String {
    fn into_seg(self) -> Seg {
        Seg::Key(self.clone())
    }
}
impl IntoSeg for usize {
    fn into_seg(self) -> Seg {
        Seg::Index(self)
    }
}

/// A problem in an input file, with where it is and what to do about it.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Several problems found in one pass, so the user fixes them all at once.
#[derive(Debug, Clone)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// The text of one input file, able to turn spans and key paths into line numbers.
pub struct SourceText {
    pub path: PathBuf,
    pub text: String,
    doc: Option<toml_edit::Document<String>>,
}

impl SourceText {
    pub fn new(path: &Path, text: String) -> Self {
        let doc = toml_edit::Document::parse(text.clone()).ok();
        SourceText {
            path: path.to_path_buf(),
            text,
            doc,
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
        (line, col)
    }

    /// The span of the value at `path`, or of the nearest parent that exists.
    pub fn span_of(&self, path: &[Seg]) -> Option<Range<usize>> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut best: Option<Range<usize>> = None;
        for seg in path {
            // A key's own span points at the line the user typed it on; prefer it for tables.
            let (key_span, next) = match (node, seg) {
                (Node::Table(t), Seg::Key(k)) => match t.get_key_value(k) {
                    Some((key, item)) => (key.span(), Node::from_item(item)),
                    None => (None, None),
                },
                (Node::InlineTable(t), Seg::Key(k)) => match t.get_key_value(k) {
                    Some((key, item)) => (key.span(), Node::from_item(item)),
                    None => (None, None),
                },
                (Node::Tables(a), Seg::Index(i)) => (None, a.get(*i).map(Node::Table)),
                (Node::Array(a), Seg::Index(i)) => (None, a.get(*i).map(Node::from_value)),
                _ => (None, None),
            };
            if key_span.is_some() {
                best = key_span;
            }
            match next {
                Some(n) => {
                    if let Some(s) = n.span() {
                        best = Some(s);
                    }
                    node = n;
                }
                None => break,
            }
        }
        best
    }

    /// An error at `path` (or at the top of the file when the path is not found).
    pub fn error_at(
        &self,
        path: &[Seg],
        message: impl Into<String>,
        hint: Option<&str>,
    ) -> SpecError {
        let (line, column) = match self.span_of(path) {
            Some(span) => {
                let (l, c) = self.line_col(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        SpecError {
            file: self.path.clone(),
            line,
            column,
            message: message.into(),
            hint: hint.map(str::to_string),
        }
    }

    /// A serde/TOML error turned into file:line form.
    pub fn from_toml(&self, err: &toml::de::Error) -> SpecError {
        let (line, column) = match err.span() {
            Some(span) => {
                let (l, c) = self.line_col(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        let message = err.message().trim().to_string();
        let hint = if message.contains("unknown field") {
            Some(
                "check the spelling; examples/README.md lists every key of the cluster file".into(),
            )
        } else {
            None
        };
        SpecError {
            file: self.path.clone(),
            line,
            column,
            message,
            hint,
        }
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    InlineTable(&'a toml_edit::InlineTable),
    Tables(&'a toml_edit::ArrayOfTables),
    Array(&'a toml_edit::Array),
    Scalar(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn from_item(item: &'a toml_edit::Item) -> Option<Node<'a>> {
        match item {
            toml_edit::Item::Table(t) => Some(Node::Table(t)),
            toml_edit::Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            toml_edit::Item::Value(v) => Some(Node::from_value(v)),
            toml_edit::Item::None => None,
        }
    }

    fn from_value(value: &'a toml_edit::Value) -> Node<'a> {
        match value {
            toml_edit::Value::InlineTable(t) => Node::InlineTable(t),
            toml_edit::Value::Array(a) => Node::Array(a),
            v => Node::Scalar(v),
        }
    }

    fn span(&self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::InlineTable(t) => t.span(),
            Node::Tables(a) => a.span(),
            Node::Array(a) => a.span(),
            Node::Scalar(v) => v.span(),
        }
    }
}
