//! What an API key may do. A key carries a set of roles within one tenant; the admin role of
//! the platform tenant manages keys for every tenant.

use std::fmt;
use std::str::FromStr;

/// One role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Submits jobs.
    Submitter,
    /// Approves or rejects jobs awaiting a human.
    Approver,
    /// Runs the system: policy, DLQ, cancellations, audit.
    Operator,
    /// Manages keys; implies every other role in its tenant.
    Admin,
    /// Claims and completes jobs.
    Worker,
    /// Reads what the other roles read in its tenant (jobs, approvals, the DLQ, audit, policy
    /// versions and hashes) and changes nothing.
    Viewer,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] =
        [Self::Submitter, Self::Approver, Self::Operator, Self::Admin, Self::Worker, Self::Viewer];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitter => "submitter",
            Self::Approver => "approver",
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Worker => "worker",
            Self::Viewer => "viewer",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|r| r.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown role `{text}`; expected one of {}", names.join(", "))
        })
    }
}

/// A set of roles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    /// Whether the set grants `role`; admin grants everything.
    pub fn allows(self, role: Role) -> bool {
        self.0 & (role.bit() | Role::Admin.bit()) != 0
    }

    /// Whether the set may read what `role` reads: `role` itself, or the viewer role.
    pub fn reads(self, role: Role) -> bool {
        self.allows(role) || self.0 & Role::Viewer.bit() != 0
    }

    /// The roles in the set, in a stable order.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.0 & r.bit() != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, r| bits | r.bit()))
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Role::as_str).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_role() {
        let admin: Roles = [Role::Admin].into_iter().collect();
        assert!(Role::ALL.iter().all(|r| admin.allows(*r)));
        let submitter: Roles = [Role::Submitter].into_iter().collect();
        assert!(submitter.allows(Role::Submitter));
        assert!(!submitter.allows(Role::Approver));
        assert_eq!(submitter.to_string(), "submitter");
        assert_eq!("worker".parse::<Role>(), Ok(Role::Worker));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn a_viewer_reads_and_does_nothing_else() {
        let viewer: Roles = [Role::Viewer].into_iter().collect();
        assert!(Role::ALL.iter().all(|r| viewer.reads(*r)));
        assert!(Role::ALL.iter().all(|r| *r == Role::Viewer || !viewer.allows(*r)));
        let worker: Roles = [Role::Worker].into_iter().collect();
        assert!(!worker.reads(Role::Operator));
        assert_eq!("viewer".parse::<Role>(), Ok(Role::Viewer));
    }
}
