//! Source files and diagnostics: every validation error points at `path:line:column`.
//!
//! The loader reads each desired-state file once into a [`SourceFile`]; spans (byte ranges) found
//! while parsing become [`Loc`]s only when a diagnostic is reported, so nothing is computed for
//! valid input.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One file of the desired-state directory (TOML, or a file a TOML value points at).
#[derive(Debug)]
pub struct SourceFile {
    /// Path as the user should see it (relative to the working directory when possible).
    pub display: String,
    /// Path on disk.
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: PathBuf, display: String, text: String) -> Arc<Self> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Arc::new(SourceFile {
            display,
            path,
            text,
            line_starts,
        })
    }

    /// Line and column (both 1-based, column counted in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    /// Byte offset of a 1-based line and column, as reported by parsers that count lines.
    pub fn offset_of(&self, line: usize, col: usize) -> usize {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        let rest = &self.text[start..];
        start
            + rest
                .char_indices()
                .nth(col.saturating_sub(1))
                .map(|(i, _)| i)
                .unwrap_or(rest.len())
    }

    pub fn loc(&self, offset: usize) -> Loc {
        let (line, column) = self.line_col(offset);
        Loc {
            file: self.display.clone(),
            line,
            column,
        }
    }

    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// A position in a desired-state file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Loc {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Where a value was written: a file and a byte range in it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<SourceFile>,
    pub span: Range<usize>,
}

impl Origin {
    pub fn loc(&self) -> Loc {
        self.file.loc(self.span.start)
    }
}

/// One validation error.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Diagnostic {
    pub loc: Loc,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.loc, self.message)
    }
}

/// Collects every error of a load, so the user sees them all at once.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error(&mut self, loc: Loc, message: impl Into<String>) {
        self.items.push(Diagnostic {
            loc,
            message: message.into(),
        });
    }

    pub fn at(&mut self, file: &SourceFile, offset: usize, message: impl Into<String>) {
        self.error(file.loc(offset), message);
    }

    pub fn at_origin(&mut self, origin: &Origin, message: impl Into<String>) {
        self.error(origin.loc(), message);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Sorted by file and position, duplicates removed.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort();
        self.items.dedup();
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let f = SourceFile::new("a".into(), "a".into(), "ab\nçd\n".into());
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(3), (2, 1));
        assert_eq!(f.line_col(5), (2, 2)); // after the two-byte ç
        assert_eq!(f.offset_of(2, 2), 5);
    }
}
