//! Reading an applied tree for an answer: every file of it for `/v1/services/<name>`,
//! one file for `/files/<path>`, both opened beneath the tree's root.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use super::types::TreeFile;

/// Every file below `root`, by path relative to it.
pub(super) fn read_tree(root: &Path) -> std::io::Result<BTreeMap<String, TreeFile>> {
    let root_fd = crate::beneath::open_root(root)?;
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                let symlink = String::from_utf8_lossy(target.as_os_str().as_bytes()).into_owned();
                files.insert(name, TreeFile::Symlink { symlink });
            } else {
                // Read beneath the root, as `/files/` does: what the listing found as a
                // file is read as that file, never through a link swapped in meanwhile.
                let mut bytes = Vec::new();
                crate::beneath::open_file(root_fd.as_fd(), rel.as_os_str().as_bytes())?.read_to_end(&mut bytes)?;
                let file = tree_file(&name, bytes);
                files.insert(name, file);
            }
        }
    }
    Ok(files)
}

/// A file's content as the API shows it: text (and its document) or base64.
fn tree_file(name: &str, bytes: Vec<u8>) -> TreeFile {
    match String::from_utf8(bytes) {
        Ok(text) => {
            let (document, document_error) = match parse_document(name, &text) {
                Some(Ok(document)) => (Some(document), None),
                Some(Err(problem)) => (None, Some(problem)),
                None => (None, None),
            };
            TreeFile::Text { document, document_error, text }
        }
        Err(e) => TreeFile::Binary { base64: base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) },
    }
}

/// The document in a configuration file, as JSON, for the formats the API parses.
fn parse_document(name: &str, text: &str) -> Option<Result<Value, String>> {
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
    Some(match extension.as_str() {
        "json" => serde_json::from_str(text).map_err(|e| e.to_string()),
        "yaml" | "yml" => serde_norway::from_str::<Value>(text).map_err(|e| e.to_string()),
        "toml" => toml::from_str::<toml::Table>(text)
            .map_err(|e| e.to_string())
            .and_then(|table| serde_json::to_value(table).map_err(|e| e.to_string())),
        _ => return None,
    })
}

/// The file `rel` of the tree at `root`, opened beneath it: the kernel refuses any
/// resolution that leaves it, so no link, however the tree came to hold it, serves
/// bytes from outside.
pub(super) fn read_file(root: &Path, rel: &[u8]) -> std::io::Result<Vec<u8>> {
    let root = crate::beneath::open_root(root)?;
    let mut file = crate::beneath::open_file(root.as_fd(), rel)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_are_parsed_by_extension() {
        let json = parse_document("a/app.json", r#"{"a":[1,2]}"#).and_then(Result::ok);
        assert_eq!(json, Some(json!({"a": [1, 2]})));
        let yaml = parse_document("app.YAML", "a:\n  - 1\n  - x\n").and_then(Result::ok);
        assert_eq!(yaml, Some(json!({"a": [1, "x"]})));
        let toml = parse_document("app.toml", "[server]\nport = 8080\n").and_then(Result::ok);
        assert_eq!(toml, Some(json!({"server": {"port": 8080}})));
        assert!(matches!(parse_document("bad.json", "{"), Some(Err(_))));
        assert!(parse_document("README", "text").is_none());
    }
}
