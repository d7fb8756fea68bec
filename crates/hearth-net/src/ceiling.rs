//! A tenant's network ceiling: the widest [`NetworkPolicy`] the operator lets a tenant's sandboxes
//! ask for (the tokens file's `network = {...}` per tenant). [`within_ceiling`] checks a requested
//! policy against it and returns the policy to enforce (the request plus the ceiling's deny
//! entries), or says which part of the request reaches above the ceiling. Pure.
//!
//! - ceiling `none`: only `none` may be asked for;
//! - ceiling `allow`: no `open`, and every allow entry must be covered by a ceiling allow entry
//!   (same name; a name or narrower wildcard under a ceiling wildcard; a CIDR inside a ceiling
//!   CIDR; a ceiling entry with a port covers only that port);
//! - ceiling `open` (the default when the tokens file sets none): anything, except that an allow
//!   entry reaching into a private range (RFC 1918, CGNAT, ULA) must be covered by a ceiling allow
//!   entry, so no tenant reaches the node's private networks unless the operator listed them.

use ipnet::IpNet;

use crate::policy::{Blocked, Entry, Mode, NetworkPolicy, PolicyError, Target};

/// Why a requested policy is refused under a ceiling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CeilingError {
    #[error("network mode '{asked}' is above this tenant's ceiling ('{ceiling}')")]
    Mode { asked: String, ceiling: String },
    #[error("network entry '{0}' is outside this tenant's allowed destinations")]
    Entry(String),
    #[error("with this tenant's own deny entries: {0}")]
    Policy(#[from] PolicyError),
}

/// The policy to enforce for `asked` under `ceiling`, or why `asked` reaches above it.
pub fn within_ceiling(
    asked: &NetworkPolicy,
    ceiling: &NetworkPolicy,
) -> Result<NetworkPolicy, CeilingError> {
    let mode_error = || CeilingError::Mode {
        asked: mode_name(asked.mode).into(),
        ceiling: mode_name(ceiling.mode).into(),
    };
    let covered = |entry: &Entry| ceiling.allow.iter().any(|c| covers(c, entry));
    match ceiling.mode {
        Mode::None if asked.mode != Mode::None => return Err(mode_error()),
        Mode::None => {}
        Mode::Allow if asked.mode == Mode::Open => return Err(mode_error()),
        Mode::Allow => {
            if let Some(outside) = asked.allow.iter().find(|e| !covered(e)) {
                return Err(CeilingError::Entry(outside.to_string()));
            }
        }
        Mode::Open => {
            let private = Blocked::for_host(&[]).private;
            let reaches_private = |e: &Entry| match &e.target {
                Target::Net(net) => private.iter().any(|p| overlaps(p, net)),
                _ => false,
            };
            if let Some(outside) = asked
                .allow
                .iter()
                .find(|e| reaches_private(e) && !covered(e))
            {
                return Err(CeilingError::Entry(outside.to_string()));
            }
        }
    }
    let mut deny = asked.deny.clone();
    deny.extend(
        ceiling
            .deny
            .iter()
            .filter(|d| !asked.deny.contains(d))
            .cloned(),
    );
    Ok(NetworkPolicy::new(asked.mode, asked.allow.clone(), deny)?)
}

/// Does ceiling entry `c` allow at least everything `e` allows?
fn covers(c: &Entry, e: &Entry) -> bool {
    let port_ok = c.port.is_none() || c.port == e.port;
    port_ok
        && match (&c.target, &e.target) {
            (Target::Domain(a), Target::Domain(b)) => a == b,
            (Target::Wildcard(base), Target::Domain(name)) => below(name, base),
            (Target::Wildcard(a), Target::Wildcard(b)) => a == b || below(b, a),
            (Target::Net(a), Target::Net(b)) => a.contains(b),
            _ => false,
        }
}

/// Is `name` strictly below `base` (`a.example.org` below `example.org`)?
fn below(name: &str, base: &str) -> bool {
    name.strip_suffix(base)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::None => "none",
        Mode::Allow => "allow",
        Mode::Open => "open",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        let parse = |l: &[&str]| l.iter().map(|s| s.parse::<Entry>().unwrap()).collect();
        NetworkPolicy::new(mode, parse(allow), parse(deny)).unwrap()
    }

    #[test]
    fn a_none_ceiling_allows_only_none() {
        let ceiling = NetworkPolicy::none();
        assert!(within_ceiling(&NetworkPolicy::none(), &ceiling).is_ok());
        let asked = policy(Mode::Allow, &["example.com"], &[]);
        assert!(matches!(
            within_ceiling(&asked, &ceiling),
            Err(CeilingError::Mode { .. })
        ));
    }

    #[test]
    fn an_allow_ceiling_covers_names_wildcards_cidrs_and_ports() {
        let ceiling = policy(
            Mode::Allow,
            &["*.example.org", "api.example.com:443", "198.51.100.0/24"],
            &["bad.example.org"],
        );
        for ok in [
            &["a.example.org"][..],
            &["*.b.example.org"],
            &["*.example.org"],
            &["api.example.com:443"],
            &["198.51.100.128/25:80"],
        ] {
            let asked = policy(Mode::Allow, ok, &[]);
            let effective = within_ceiling(&asked, &ceiling).unwrap();
            assert_eq!(effective.allow, asked.allow);
            assert_eq!(
                effective.deny,
                vec!["bad.example.org".parse::<Entry>().unwrap()],
                "the ceiling's deny entries apply"
            );
        }
        for outside in [
            "example.org",
            "api.example.com",
            "api.example.com:80",
            "198.51.0.0/16",
            "203.0.113.7",
        ] {
            let asked = policy(Mode::Allow, &[outside], &[]);
            match within_ceiling(&asked, &ceiling) {
                Err(CeilingError::Entry(e)) => assert_eq!(e, outside),
                other => panic!("{outside}: {other:?}"),
            }
        }
        assert!(matches!(
            within_ceiling(&policy(Mode::Open, &[], &[]), &ceiling),
            Err(CeilingError::Mode { .. })
        ));
    }

    #[test]
    fn an_open_ceiling_still_guards_the_private_ranges() {
        let ceiling = policy(Mode::Open, &["10.1.0.0/16"], &[]);
        assert!(within_ceiling(&policy(Mode::Open, &[], &[]), &ceiling).is_ok());
        assert!(within_ceiling(&policy(Mode::Allow, &["10.1.2.0/24"], &[]), &ceiling).is_ok());
        for private in ["10.0.0.0/8", "192.168.1.1", "0.0.0.0/0"] {
            let asked = policy(Mode::Open, &[private], &[]);
            assert!(
                matches!(
                    within_ceiling(&asked, &ceiling),
                    Err(CeilingError::Entry(_))
                ),
                "{private}"
            );
        }
    }
}
