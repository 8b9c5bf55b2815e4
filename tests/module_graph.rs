//! The shape of `src/`, read from the code: every module says what it is for, no two modules
//! depend on each other (directly or around a loop), and the pure layers depend only on what
//! ARCHITECTURE.md allows them. A module may use its ancestors' items (its context); every other
//! `use` and every `crate::`/`super::` path in code (not in comments, not in unit tests) is an
//! edge of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path, as `["crate", "store", "redis"]`.
type Module = Vec<String>;

/// Every module of `src/` and the file that holds it (unit-test files left out).
fn modules() -> BTreeMap<Module, PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Module = vec!["crate".into()];
            module.extend(
                relative
                    .iter()
                    .map(|part| part.to_string_lossy().into_owned()),
            );
            let last = module.last().unwrap().clone();
            if last == "tests" || last.ends_with("_tests") || last == "main" {
                continue;
            }
            if matches!(last.as_str(), "mod" | "lib") {
                module.pop();
            }
            found.insert(module, path);
        }
    }
    found
}

/// `source` without comment lines and without its inline unit tests.
fn code(source: &str) -> String {
    let mut kept = Vec::new();
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests {"))
        {
            break;
        }
        if !trimmed.starts_with("//") {
            kept.push(line);
        }
    }
    kept.join("\n")
}

/// The paths a `use` tree names, each as its segments (`a::{b, c::d}` gives `a::b`, `a::c::d`).
fn use_paths(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let (mut depth, mut start) = (0, 0);
        for (at, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    use_paths(&inner[start..at], prefix, out);
                    start = at + 1;
                }
                _ => {}
            }
        }
        use_paths(&inner[start..], prefix, out);
        return;
    }
    if tree.is_empty() {
        return;
    }
    let (head, rest) = match tree.find('{') {
        Some(brace) => tree.split_at(brace),
        None => (tree, ""),
    };
    let mut path = prefix.to_vec();
    let head = head.split(" as ").next().unwrap();
    path.extend(
        head.split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
            .map(String::from),
    );
    if rest.is_empty() {
        out.push(path);
    } else {
        use_paths(rest, &path, out);
    }
}

/// The module `path`, named in `from`, refers to (the longest module prefix), if any.
fn resolve(from: &Module, path: &[String], modules: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    let (first, rest) = path.split_first()?;
    let mut full: Module = match first.as_str() {
        "crate" => vec!["crate".into()],
        "super" => from[..from.len() - 1].to_vec(),
        child if modules.contains_key(&[from.clone(), vec![child.into()]].concat()) => {
            let mut child_path = from.clone();
            child_path.push(child.into());
            child_path
        }
        _ => return None,
    };
    let mut rest = rest;
    while let Some(("super", tail)) = rest.split_first().map(|(h, t)| (h.as_str(), t)) {
        full.pop();
        rest = tail;
    }
    full.extend(rest.iter().cloned());
    (1..=full.len())
        .rev()
        .map(|k| full[..k].to_vec())
        .find(|prefix| modules.contains_key(prefix))
}

/// Every module's dependencies on modules other than itself and its ancestors.
fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = modules();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let source = code(&std::fs::read_to_string(file).unwrap());
        let mut paths = Vec::new();
        // A `use` item begins a line and ends at the next `;`.
        for statement in source.split(';') {
            let mut from_use = statement.lines().map(str::trim_start).skip_while(|line| {
                !["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
                    .iter()
                    .any(|keyword| line.starts_with(keyword))
            });
            if let Some(first) = from_use.next() {
                let tree = first.split_once("use ").unwrap().1;
                let tree = std::iter::once(tree)
                    .chain(from_use)
                    .collect::<Vec<_>>()
                    .join(" ");
                use_paths(&tree, &[], &mut paths);
            }
        }
        for anchor in ["crate::", "super::"] {
            for (at, _) in source.match_indices(anchor) {
                let before = source[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let path: String = source[at..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                paths.push(path.split("::").map(String::from).collect());
            }
        }
        let edges = paths
            .iter()
            .filter_map(|path| resolve(module, path, &modules))
            .filter(|target| target != module && !module.starts_with(target))
            .collect();
        graph.insert(module.clone(), edges);
    }
    graph
}

fn name(module: &Module) -> String {
    module.join("::")
}

/// A loop of dependencies through `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        module: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        trail: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(module) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = trail.iter().position(|m| m == module).unwrap();
                let mut cycle = trail[from..].to_vec();
                cycle.push(module.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(module.clone(), Mark::Open);
        trail.push(module.clone());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, trail) {
                return Some(cycle);
            }
        }
        trail.pop();
        marks.insert(module.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let graph = graph();
    assert!(
        graph.len() > 40,
        "the walk found the modules: {}",
        graph.len()
    );
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!("modules depend on each other: {}", names.join(" -> "));
    }
}

#[test]
fn the_graph_sees_uses_paths_and_nested_trees() {
    let mut paths = Vec::new();
    use_paths("super::{a, b::{c, d as e}, f::*}", &[], &mut paths);
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        joined,
        ["super::a", "super::b::c", "super::b::d", "super::f"]
    );
    // The engine's rules use its room: an edge the graph must hold.
    let graph = graph();
    let rules = ["crate", "engine", "rules"].map(String::from).to_vec();
    let room = ["crate", "engine", "room"].map(String::from).to_vec();
    assert!(graph[&rules].contains(&room), "{:?}", graph[&rules]);
}

/// What the pure layers may depend on (ARCHITECTURE.md, "What each module may depend on").
#[test]
fn the_pure_layers_depend_only_on_what_they_may() {
    let allowed: [(&str, &[&str]); 9] = [
        ("crate::ids", &[]),
        ("crate::backoff", &[]),
        ("crate::clock", &[]),
        ("crate::error", &["crate::pb"]),
        ("crate::telemetry", &["crate::pb", "crate::error"]),
        (
            "crate::engine",
            &["crate::error", "crate::pb", "crate::ids"],
        ),
        (
            "crate::store",
            &[
                "crate::engine",
                "crate::error",
                "crate::pb",
                "crate::ids",
                "crate::codec",
                "crate::telemetry",
                "crate::backoff",
                "crate::clock",
            ],
        ),
        ("crate::page_token", &["crate::auth", "crate::ids"]),
        (
            "crate::validate",
            &[
                "crate::engine",
                "crate::error",
                "crate::pb",
                "crate::ids",
                "crate::page_token",
            ],
        ),
    ];
    let graph = graph();
    for (layer, may) in allowed {
        for (module, edges) in &graph {
            let in_layer = name(module) == layer || name(module).starts_with(&format!("{layer}::"));
            if !in_layer {
                continue;
            }
            for target in edges {
                let target_name = name(target);
                let inside = target_name.starts_with(&format!("{layer}::"));
                assert!(
                    inside || may.contains(&target_name.as_str()),
                    "{} depends on {target_name}; {layer} may depend only on {may:?}",
                    name(module)
                );
            }
        }
    }
}

#[test]
fn every_module_says_what_it_is_for() {
    for (module, file) in modules() {
        let source = std::fs::read_to_string(&file).unwrap();
        assert!(
            source.trim_start().starts_with("//!"),
            "{} ({}) has no module doc saying what it is for",
            name(&module),
            file.display()
        );
    }
}
