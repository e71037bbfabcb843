//! `[replication] sync`: which targets a write must reach before it is acknowledged,
//! PostgreSQL style — `"ANY k (a, b, …)"`, `"FIRST k (a, b, …)"`, or a single target
//! name (`"dr1"`, the same as `FIRST 1 (dr1)`). The listed targets are sync, every
//! other target async. This module owns the text: parsing it with precise errors and
//! writing it back; the gate's arithmetic is `ferry_proto::target::quorum_gate_position`.
use std::collections::HashSet;

use ferry_proto::target::SyncQuorum;

/// A parsed `replication.sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPolicy {
    /// `Any(k)` or `First(k)`, `1 <= k <= names.len()` (never `All`: that is the
    /// behaviour without a policy).
    pub quorum: SyncQuorum,
    /// The sync targets, in the order written (FIRST's priority).
    pub names: Vec<String>,
}

impl SyncPolicy {
    /// Parses the value of `replication.sync`. The message does not name the key (the
    /// caller does).
    pub fn parse(text: &str) -> Result<SyncPolicy, String> {
        let t = text.trim();
        let Some(open) = t.find('(') else {
            return Self::single(t);
        };
        let Some(inner) = t[open + 1..].strip_suffix(')') else {
            return Err(format!(
                "'{text}': the list must end with ')' (ANY k (a, b) or FIRST k (a, b))"
            ));
        };
        let mut head = t[..open].split_whitespace();
        let (kind, count) = match (head.next(), head.next(), head.next()) {
            (Some(kind), Some(count), None) => (kind, count),
            _ => {
                return Err(format!(
                    "'{text}': write ANY k (a, b) or FIRST k (a, b) before the list"
                ))
            }
        };
        let k: usize = count
            .parse()
            .map_err(|_| format!("'{text}': '{count}' is not a count of targets"))?;
        let names = Self::names(text, inner)?;
        if k == 0 || k > names.len() {
            return Err(format!(
                "'{text}': the count must be 1 to {} (the targets listed)",
                names.len()
            ));
        }
        let quorum = if kind.eq_ignore_ascii_case("any") {
            SyncQuorum::Any(k)
        } else if kind.eq_ignore_ascii_case("first") {
            SyncQuorum::First(k)
        } else {
            return Err(format!("'{text}': '{kind}' (use ANY or FIRST)"));
        };
        Ok(SyncPolicy { quorum, names })
    }

    /// A single target name: it alone is sync.
    fn single(t: &str) -> Result<SyncPolicy, String> {
        if t.is_empty() || t.contains([',', ')', ' ', '\t']) {
            return Err(format!(
                "'{t}': a target name, ANY k (a, b) or FIRST k (a, b)"
            ));
        }
        Ok(SyncPolicy {
            quorum: SyncQuorum::First(1),
            names: vec![t.to_string()],
        })
    }

    /// The comma-separated names inside the parentheses: none empty, none twice.
    fn names(text: &str, inner: &str) -> Result<Vec<String>, String> {
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        for n in inner.split(',').map(str::trim) {
            if n.is_empty() || n.contains([' ', '\t', '(', ')']) {
                return Err(format!("'{text}': '{n}' is not a target name"));
            }
            if !seen.insert(n) {
                return Err(format!("'{text}': '{n}' is listed twice"));
            }
            names.push(n.to_string());
        }
        Ok(names)
    }

    /// Whether `name` is one of the sync targets.
    pub fn lists(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, k) = match self.quorum {
            SyncQuorum::First(1) if self.names.len() == 1 => {
                return f.write_str(&self.names[0]);
            }
            SyncQuorum::Any(k) => ("ANY", k),
            SyncQuorum::First(k) => ("FIRST", k),
            SyncQuorum::All => ("ANY", self.names.len()),
        };
        write!(f, "{kind} {k} ({})", self.names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_any_first_and_a_single_name() {
        let p = SyncPolicy::parse("ANY 1 (dr1, dr2)").unwrap();
        assert_eq!(p.quorum, SyncQuorum::Any(1));
        assert_eq!(p.names, names(&["dr1", "dr2"]));
        let p = SyncPolicy::parse("  first 2 (b,a , c)  ").unwrap();
        assert_eq!(p.quorum, SyncQuorum::First(2));
        assert_eq!(p.names, names(&["b", "a", "c"]), "order kept: priority");
        let p = SyncPolicy::parse("dr1").unwrap();
        assert_eq!(p.quorum, SyncQuorum::First(1));
        assert_eq!(p.names, names(&["dr1"]));
        assert!(p.lists("dr1") && !p.lists("dr2"));
    }

    #[test]
    fn writes_back_what_it_parses() {
        for t in [
            "ANY 1 (dr1, dr2)",
            "FIRST 2 (a, b, c)",
            "dr1",
            "ANY 1 (dr1)",
        ] {
            let p = SyncPolicy::parse(t).unwrap();
            assert_eq!(p.to_string(), t);
            assert_eq!(SyncPolicy::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn refuses_with_a_precise_reason() {
        let err = |t: &str| SyncPolicy::parse(t).unwrap_err();
        assert!(
            err("ANY 0 (a, b)").contains("the count must be 1 to 2"),
            "{}",
            err("ANY 0 (a, b)")
        );
        assert!(err("ANY 3 (a, b)").contains("the count must be 1 to 2"));
        assert!(err("ANY 1 (a, a)").contains("'a' is listed twice"));
        assert!(err("ANY 1 (a, )").contains("'' is not a target name"));
        assert!(err("ANY x (a)").contains("'x' is not a count"));
        assert!(err("SOME 1 (a)").contains("'SOME' (use ANY or FIRST)"));
        assert!(err("ANY (a)").contains("before the list"));
        assert!(err("ANY 1 2 (a)").contains("before the list"));
        assert!(err("ANY 1 (a, b").contains("must end with ')'"));
        assert!(err("a, b").contains("a target name, ANY k"));
        assert!(err("").contains("a target name, ANY k"));
        assert!(err("ANY 1 (a b)").contains("'a b' is not a target name"));
    }
}
