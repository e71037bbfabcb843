//! ferryd's modules import each other without cycles, at folder level (`ship` → `store`)
//! and at module level (`ship::session` → `ship::target`). Reads daemon/src, collects
//! every `crate::a::b` path outside comments and `#[cfg(test)]` code, resolves it to
//! the longest module prefix and fails listing each cycle (a strongly connected set).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module paths (`["ship", "session"]`) of every .rs file under `dir`.
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<Vec<String>, PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading daemon/src") {
        let path = entry.expect("reading daemon/src").path();
        if path.is_dir() {
            modules(src, &path, out);
            continue;
        }
        let Ok(rel) = path.strip_prefix(src) else {
            continue;
        };
        let Some(rel) = rel.to_str().and_then(|r| r.strip_suffix(".rs")) else {
            continue;
        };
        let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        if !parts.is_empty() {
            out.insert(parts, path);
        }
    }
}

/// The code of a file without comments and without what follows its first
/// `#[cfg(test)]` (test modules sit at the end of our files).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `crate::a::b::C` paths of `code`, as segments.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `ferry_crate::`
        }
        let rest = &code[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(
            rest[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        );
    }
    out
}

/// Edges between modules cut to `depth` segments.
fn graph(
    mods: &BTreeMap<Vec<String>, PathBuf>,
    depth: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let key = |m: &[String]| m[..m.len().min(depth)].join("::");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, path) in mods {
        let from = key(m);
        let text = std::fs::read_to_string(path).expect("reading a module");
        g.entry(from.clone()).or_default();
        for p in crate_paths(&code(&text)) {
            let Some(target) = (1..=p.len())
                .rev()
                .map(|n| &p[..n])
                .find(|t| mods.contains_key(*t))
            else {
                continue;
            };
            let to = key(target);
            if to != from {
                g.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    g
}

/// Strongly connected sets of more than one module (each a cycle).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &String| {
        let (mut seen, mut todo) = (BTreeSet::new(), vec![from.clone()]);
        while let Some(n) = todo.pop() {
            for m in g.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|k| (k, reach(k))).collect();
    let mut out: BTreeSet<Vec<String>> = BTreeSet::new();
    for (a, ra) in &reachable {
        let set: Vec<String> = ra
            .iter()
            .filter(|b| reachable[b].contains(*a))
            .cloned()
            .collect();
        if set.len() > 1 {
            out.insert(set);
        }
    }
    out.into_iter().collect()
}

#[test]
fn no_import_cycles_between_folders_or_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    modules(&src, &src, &mut mods);
    assert!(
        mods.contains_key(&vec!["ship".to_string(), "session".to_string()]),
        "{mods:?}"
    );
    let mut found = Vec::new();
    for depth in [1, 2] {
        let g = graph(&mods, depth);
        assert!(g.len() > 8, "depth {depth}: only {} modules seen", g.len());
        for c in cycles(&g) {
            found.push(format!(
                "depth {depth}: cycle of {}: {}",
                c.len(),
                c.join(", ")
            ));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_cycle_finder_sees_a_cycle_and_ignores_tests_and_comments() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(
        cycles(&g),
        vec![vec!["a".to_string(), "b".into(), "c".into()]]
    );
    let text = "use crate::ship::feed::Tail; // crate::node\n#[cfg(test)]\nuse crate::pit;";
    let paths = crate_paths(&code(text));
    assert_eq!(
        paths,
        vec![vec!["ship".to_string(), "feed".into(), "Tail".into()]]
    );
}
