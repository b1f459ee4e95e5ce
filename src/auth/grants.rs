//! Grants: which documents a credential may read, write or administer.

use serde::Deserialize;

use crate::id::DocId;

/// What a grant allows, ordered: each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// GET/HEAD, `?since=`, subscribing (WebSocket, SSE), receiving over the repo protocol,
    /// ephemeral messages.
    Read,
    /// Read, plus PUT/POST/DELETE and uploads over every interface.
    Write,
    /// Everything, including the server's `/_/` endpoints (with `ids = "*"`).
    Admin,
}

/// Which ids a grant covers: an exact id, a prefix ending in `*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    Any,
    Prefix(String),
    Exact(String),
}

impl IdPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(IdPattern::Any);
        }
        if let Some(prefix) = s.strip_suffix('*') {
            if prefix.contains('*') {
                return Err(format!(
                    "bad ids pattern {s:?}: only a trailing * is allowed"
                ));
            }
            return Ok(IdPattern::Prefix(prefix.to_owned()));
        }
        if s.contains('*') {
            return Err(format!(
                "bad ids pattern {s:?}: only a trailing * is allowed"
            ));
        }
        DocId::parse(s).map_err(|e| format!("bad ids pattern {s:?}: {e}"))?;
        Ok(IdPattern::Exact(s.to_owned()))
    }

    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Any => true,
            IdPattern::Prefix(p) => id.starts_with(p.as_str()),
            IdPattern::Exact(e) => id == e,
        }
    }
}

impl<'de> Deserialize<'de> for IdPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        IdPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One grant: `{ ids = "alice-*", access = "write" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub ids: IdPattern,
    pub access: Access,
}

/// The widest access the grants give on document `id`.
pub fn access_for(grants: &[Grant], id: &str) -> Option<Access> {
    grants
        .iter()
        .filter(|g| g.ids.matches(id))
        .map(|g| g.access)
        .max()
}

/// Whether the grants allow the server's own endpoints (`/_/`): admin on every id.
pub fn is_server_admin(grants: &[Grant]) -> bool {
    grants
        .iter()
        .any(|g| g.access == Access::Admin && g.ids == IdPattern::Any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ids: &str, access: Access) -> Grant {
        Grant {
            ids: IdPattern::parse(ids).unwrap(),
            access,
        }
    }

    #[test]
    fn the_widest_matching_grant_wins() {
        let grants = [
            grant("alice-*", Access::Write),
            grant("team-board", Access::Read),
            grant("alice-secret", Access::Read),
        ];
        assert_eq!(access_for(&grants, "alice-notes"), Some(Access::Write));
        assert_eq!(access_for(&grants, "alice-secret"), Some(Access::Write));
        assert_eq!(access_for(&grants, "team-board"), Some(Access::Read));
        assert_eq!(access_for(&grants, "team-board-2"), None);
        assert_eq!(access_for(&grants, "bob"), None);
        assert!(Access::Admin > Access::Write && Access::Write > Access::Read);
    }

    #[test]
    fn only_admin_on_every_id_opens_the_server_endpoints() {
        assert!(is_server_admin(&[grant("*", Access::Admin)]));
        assert!(!is_server_admin(&[grant("a*", Access::Admin)]));
        assert!(!is_server_admin(&[grant("*", Access::Write)]));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(IdPattern::parse("a*b").is_err());
        assert!(IdPattern::parse("*a*").is_err());
        assert!(IdPattern::parse("_bad").is_err());
        assert_eq!(IdPattern::parse("*").unwrap(), IdPattern::Any);
        assert!(IdPattern::parse("").is_err());
        assert!(IdPattern::parse("a*").unwrap().matches("abc"));
    }
}
