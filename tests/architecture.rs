//! The layering ARCHITECTURE.md describes, enforced: reads `src/` and fails when a module uses
//! one it may not (the table below is ARCHITECTURE.md's table), when a transport touches the
//! store, or when two modules — top-level ones, or files of one module — import each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it may use. Keep in step with ARCHITECTURE.md.
const ALLOWED: &[(&str, &[&str])] = &[
    ("alloc", &[]),
    ("accept", &["error", "limits", "metrics"]),
    ("metrics", &[]),
    ("error", &["metrics"]),
    ("id", &["error"]),
    ("auth", &["id", "metrics"]),
    ("config", &["auth", "storage"]),
    ("upload", &["error"]),
    ("limits", &["error", "id"]),
    ("storage", &["id"]),
    ("doc", &["storage", "upload", "id", "error", "metrics"]),
    ("cluster", &["doc", "storage", "upload", "id"]),
    ("live", &["doc", "error", "id"]),
    ("repo", &["doc", "upload", "id", "error"]),
    (
        "state",
        &["upload", "auth", "doc", "limits", "live", "repo"],
    ),
    (
        "transport",
        &[
            "auth", "state", "doc", "limits", "upload", "error", "id", "metrics",
        ],
    ),
    (
        "http",
        &["transport", "auth", "state", "doc", "error", "id"],
    ),
    (
        "ws_doc",
        &[
            "transport",
            "auth",
            "state",
            "doc",
            "live",
            "limits",
            "error",
            "id",
            "metrics",
        ],
    ),
    (
        "sse",
        &[
            "transport",
            "auth",
            "state",
            "doc",
            "live",
            "limits",
            "error",
            "id",
        ],
    ),
    (
        "repo::socket",
        &[
            "upload",
            "transport",
            "auth",
            "state",
            "doc",
            "repo",
            "limits",
            "error",
            "id",
            "metrics",
        ],
    ),
    (
        "ops",
        &["transport", "auth", "state", "doc", "alloc", "error", "id"],
    ),
    (
        "router",
        &[
            "http",
            "ws_doc",
            "sse",
            "repo::socket",
            "repo",
            "ops",
            "transport",
            "auth",
            "state",
            "error",
        ],
    ),
    (
        "server",
        &[
            "accept", "upload", "auth", "config", "doc", "state", "router", "limits", "live",
            "repo", "storage", "metrics", "cluster", "webhook",
        ],
    ),
    (
        "migrate",
        &["config", "server", "storage", "upload", "id", "error"],
    ),
    ("webhook", &["doc", "id"]),
];

/// Files that are transports: thin adapters that never touch the store.
const TRANSPORTS: &[&str] = &["http.rs", "ws_doc.rs", "sse.rs", "repo/socket.rs"];

struct File {
    /// Path under `src/`, e.g. `doc/owner.rs`.
    rel: String,
    /// Its top-level module (`doc`), or `None` for `lib.rs` and `main.rs`.
    top: Option<String>,
    code: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments (line comments and doc comments; the code has no block
/// comments), so prose that mentions a module is not an import.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn files() -> Vec<File> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let first = rel.split('/').next().unwrap_or_default();
            let top = match first {
                "lib.rs" | "main.rs" => None,
                f => Some(f.trim_end_matches(".rs").to_owned()),
            };
            let code = strip_comments(&std::fs::read_to_string(&p).expect("read"));
            File { rel, top, code }
        })
        // Test-only files (`tests.rs`, `*_tests.rs`) may reach across layers to set up a case.
        .filter(|f| !f.rel.ends_with("tests.rs"))
        .collect()
}

/// Names following `prefix::` in `code`, including `prefix::{a, b::c}` groups.
fn paths_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let pat = format!("{prefix}::");
    let mut rest = code;
    while let Some(i) = rest.find(&pat) {
        let before = rest[..i].chars().last();
        rest = &rest[i + pat.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// Files that are a node of their own in the graph, apart from their directory's module: the
/// repo socket is a transport, the rest of `repo` is the protocol (codec, sans-IO core, hub).
const OWN_NODES: &[(&str, &str)] = &[("repo/socket.rs", "repo::socket")];

/// The graph node a file belongs to.
fn node_of(f: &File) -> Option<String> {
    OWN_NODES
        .iter()
        .find(|(rel, _)| *rel == f.rel)
        .map(|(_, node)| node.to_string())
        .or_else(|| f.top.clone())
}

/// Node → the other nodes its files use.
fn module_graph(files: &[File]) -> BTreeMap<String, BTreeSet<String>> {
    let mut nodes: BTreeSet<String> = files.iter().filter_map(|f| f.top.clone()).collect();
    nodes.extend(OWN_NODES.iter().map(|(_, n)| n.to_string()));
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(node) = node_of(f) else { continue };
        let mut code = f.code.clone();
        let mut used = BTreeSet::new();
        for (_, own) in OWN_NODES {
            // `crate::repo::socket`, or `repo::socket` after `use crate::{repo, ..}`.
            if code.contains(own) {
                used.insert(own.to_string());
                code = code.replace(&format!("crate::{own}"), "");
            }
        }
        used.extend(paths_after(&code, "crate"));
        // A file that is its own node uses its directory's module through `super::`.
        if Some(&node) != f.top.as_ref() && !paths_after(&code, "super").is_empty() {
            used.extend(f.top.clone());
        }
        let uses = graph.entry(node.clone()).or_default();
        uses.extend(used.into_iter().filter(|n| nodes.contains(n) && *n != node));
    }
    graph
}

#[test]
fn every_module_uses_only_what_the_table_allows() {
    let graph = module_graph(&files());
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (module, uses) in &graph {
        let Some(may) = allowed.get(module.as_str()) else {
            problems.push(format!("{module} is not in the table (uses {uses:?})"));
            continue;
        };
        for used in uses {
            if !may.contains(&used.as_str()) {
                problems.push(format!("{module} uses {used}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\nwhole graph: {graph:#?}"
    );
}

#[test]
fn transports_never_touch_the_store() {
    let files = files();
    for rel in TRANSPORTS {
        let f = files
            .iter()
            .find(|f| f.rel == *rel)
            .unwrap_or_else(|| panic!("transport {rel} not found"));
        assert!(
            !paths_after(&f.code, "crate").contains("storage"),
            "{rel} uses crate::storage"
        );
    }
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let graph = module_graph(&files());
    // Any cycle, not only pairs: depth-first search for a back edge.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "module cycle: {:?}",
            cycle.unwrap_or_default()
        );
    }
}

#[test]
fn no_two_files_of_one_module_import_each_other() {
    let files = files();
    // (directory, file stem) → the sibling stems it uses through `super::`.
    let mut uses: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some((dir, name)) = f.rel.rsplit_once('/') else {
            continue;
        };
        if name == "mod.rs" {
            continue;
        }
        let stem = name.trim_end_matches(".rs").to_owned();
        let siblings: BTreeSet<String> = files
            .iter()
            .filter_map(|g| {
                let (d, n) = g.rel.rsplit_once('/')?;
                (d == dir && n != "mod.rs").then(|| n.trim_end_matches(".rs").to_owned())
            })
            .collect();
        let mut found: BTreeSet<String> = paths_after(&f.code, "super")
            .into_iter()
            .filter(|n| siblings.contains(n) && *n != stem)
            .collect();
        // `crate::doc::owner` from inside `doc/` counts too.
        let inside = format!("crate::{}", dir.replace('/', "::"));
        found.extend(
            paths_after(&f.code, &inside)
                .into_iter()
                .filter(|n| siblings.contains(n) && *n != stem),
        );
        uses.insert((dir.to_owned(), stem), found);
    }
    let mut pairs = Vec::new();
    for ((dir, a), used) in &uses {
        for b in used {
            let back = uses
                .get(&(dir.clone(), b.clone()))
                .is_some_and(|u| u.contains(a));
            if back && a < b {
                pairs.push(format!("{dir}/{a}.rs <-> {dir}/{b}.rs"));
            }
        }
    }
    assert!(pairs.is_empty(), "files that import each other: {pairs:?}");
}

#[test]
fn the_parser_sees_imports() {
    let code = "use crate::{doc::Documents, error};\nuse super::owner::Owner; // crate::storage\n";
    let code = strip_comments(code);
    assert_eq!(
        paths_after(&code, "crate"),
        ["doc", "error"].into_iter().map(String::from).collect()
    );
    assert_eq!(
        paths_after(&code, "super"),
        ["owner"].into_iter().map(String::from).collect()
    );
}
