//! The modules of `src/` import each other without cycles: each layer (domain, storage,
//! raft, shard, replication, shop, api, node) uses only those below it, so a part can be
//! read, tested and changed without the rest. This test reads the `crate::…` paths in
//! every source file (outside comments and `#[cfg(test)] mod tests`) and fails with the
//! cycle it finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).expect("under root").with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts = if parts.last().is_some_and(|p| p == "mod") { &parts[..parts.len() - 1] } else { &parts[..] };
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its unit tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The paths a file names after `crate::`, with `crate::a::{b, c}` read as `a::b`, `a::c`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for chunk in code.split("crate::").skip(1) {
        let base: String = chunk.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let base = base.trim_end_matches(':').to_string();
        let rest = &chunk[base.len()..];
        // `crate::a::{b, c}`, or `crate::{a, b}` with no base.
        let group = if base.is_empty() { rest.strip_prefix('{') } else { rest.strip_prefix("::{") };
        for item in group.and_then(|g| g.split('}').next()).into_iter().flat_map(|g| g.split(',')) {
            let item = item.split_whitespace().next().unwrap_or("");
            if !item.is_empty() && item != "self" {
                paths.push(if base.is_empty() { item.to_string() } else { format!("{base}::{item}") });
            }
        }
        if !base.is_empty() {
            paths.push(base);
        }
    }
    paths
}

/// The longest known module a path starts with.
fn resolve<'a>(path: &str, modules: &'a BTreeSet<String>) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| modules.get(&parts[..n].join("::")))
}

fn graph(root: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let sources: BTreeMap<String, String> = files.iter().map(|f| (module_of(root, f), code(&std::fs::read_to_string(f).expect("read source")))).collect();
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    let nested = |a: &str, b: &str| a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    sources
        .iter()
        .map(|(m, src)| {
            let deps = crate_paths(src).iter().filter_map(|p| resolve(p, &modules)).filter(|d| *d != m && !nested(m, d)).cloned().collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle, if the graph has one (depth-first search with the path on a stack).
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(n: &str, g: &Graph, stack: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn source_modules_import_each_other_without_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&root);
    assert!(g.contains_key("node") && g.contains_key("shard") && g["node"].contains("shard"), "the scan sees the modules and their imports");
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle in src/: {}", cycle.join(" -> "));
    }
}

#[test]
fn nothing_below_the_node_imports_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&root);
    let users: Vec<&String> = g.iter().filter(|(m, deps)| deps.contains("node") && *m != "main" && *m != "lib").map(|(m, _)| m).collect();
    assert!(users.is_empty(), "only the binary may start a node; these import it: {users:?}");
}

#[test]
fn a_cycle_is_found_and_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |p: &str, s: &str| {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, s).expect("write");
    };
    write("a.rs", "use crate::b::{self, inner::Thing};\n// crate::d is only mentioned\n");
    write("b/mod.rs", "pub mod inner;\n");
    write("b/inner.rs", "fn f() { crate::c::g() }\n#[cfg(test)]\nmod tests { use crate::d; }\n");
    write("c.rs", "use crate::{a, d};\n");
    write("d.rs", "");
    let g = graph(dir.path());
    assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "b::inner".to_string()]), "groups are read; comments do not count");
    assert_eq!(g["b::inner"], BTreeSet::from(["c".to_string()]), "unit tests do not count");
    let cycle = find_cycle(&g).expect("a -> b::inner -> c -> a");
    assert_eq!(cycle, ["a", "b::inner", "c", "a"]);
    // Without the edge back to `a`, no cycle.
    write("c.rs", "use crate::d;\n");
    assert_eq!(find_cycle(&graph(dir.path())), None);
}
