//! The control roles ([`Role`]): what a control-socket peer may do. Shared by the
//! control socket, which resolves a peer to a role, and the audit log, which records it.
use serde::{Deserialize, Serialize};

/// Control roles, ordered: each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Status and lists.
    Viewer,
    /// Bookmarks, point-in-time exports, verify, pause/resume.
    Operator,
    /// Role changes, rollback, full resync, reload.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named_as_on_the_wire() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for (r, name) in [
            (Role::Viewer, "viewer"),
            (Role::Operator, "operator"),
            (Role::Admin, "admin"),
        ] {
            assert_eq!(r.to_string(), name);
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::json!(name));
        }
    }
}
