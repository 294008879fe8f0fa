//! IPv4 and IPv6 networks for the `cidr_within` and `cidr_overlaps` operators. An IPv4-mapped
//! IPv6 address (`::ffff:10.0.0.1`, or a mapped network of prefix 96 or more) is the IPv4
//! address it carries, so it cannot hide from an IPv4 rule; otherwise the families never mix:
//! `::/0` is not `0.0.0.0/0`. Parsing is strict: no spaces, no leading zeros, no trailing text.

use std::fmt;
use std::net::IpAddr;

/// A network: an address family, the address bits (host bits cleared) and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Net {
    v6: bool,
    bits: u128,
    prefix: u8,
}

/// Why a network was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not an address or `address/prefix`.
    #[error("`{0}` is not an IP address or CIDR")]
    Syntax(String),
    /// A prefix longer than the family allows.
    #[error("`{0}` has a prefix longer than the address")]
    Prefix(String),
    /// Bits set past the prefix: almost always a typo in a policy.
    #[error("`{given}` has host bits set; the network is `{network}`")]
    HostBits {
        /// As written.
        given: String,
        /// What it probably meant.
        network: String,
    },
}

impl Net {
    /// Parses `address` or `address/prefix`, clearing host bits. For payload values.
    pub fn parse_lenient(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax(text.to_owned()))?;
        let (v6, bits, width) = match addr {
            IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32u8),
            IpAddr::V6(a) => (true, u128::from(a), 128u8),
        };
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| CidrError::Prefix(text.to_owned()))?
            }
            Some(_) => return Err(CidrError::Syntax(text.to_owned())),
        };
        if prefix > width {
            return Err(CidrError::Prefix(text.to_owned()));
        }
        if let IpAddr::V6(a) = addr
            && let Some(v4) = a.to_ipv4_mapped()
            && prefix >= 96
        {
            let prefix = prefix - 96;
            let bits = u128::from(u32::from(v4));
            return Ok(Self { v6: false, bits: bits & mask(false, prefix), prefix });
        }
        Ok(Self { v6, bits: bits & mask(v6, prefix), prefix })
    }

    /// Parses like [`Net::parse_lenient`] but refuses host bits. For networks in a policy.
    pub fn parse_strict(text: &str) -> Result<Self, CidrError> {
        let net = Self::parse_lenient(text)?;
        let raw = Self::parse_lenient(text.split_once('/').map_or(text, |(a, _)| a))?;
        if raw.bits != net.bits {
            return Err(CidrError::HostBits { given: text.to_owned(), network: net.to_string() });
        }
        Ok(net)
    }

    /// Whether every address of `self` lies in `outer`.
    pub fn within(&self, outer: &Net) -> bool {
        self.v6 == outer.v6
            && self.prefix >= outer.prefix
            && self.bits & mask(self.v6, outer.prefix) == outer.bits
    }

    /// Whether the two networks share at least one address.
    pub fn overlaps(&self, other: &Net) -> bool {
        self.within(other) || other.within(self)
    }
}

fn mask(v6: bool, prefix: u8) -> u128 {
    let width: u32 = if v6 { 128 } else { 32 };
    let full: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let host = width - u32::from(prefix);
    if host >= 128 { 0 } else { full & !((1u128 << host) - 1) }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", std::net::Ipv6Addr::from(self.bits), self.prefix)
        } else {
            let v4 = u32::try_from(self.bits).unwrap_or(0);
            write!(f, "{}/{}", std::net::Ipv4Addr::from(v4), self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Net {
        Net::parse_lenient(s).unwrap()
    }

    #[test]
    fn within_and_overlap() {
        assert!(net("10.1.2.3").within(&net("10.0.0.0/8")));
        assert!(net("10.1.0.0/16").within(&net("10.0.0.0/8")));
        assert!(!net("10.0.0.0/8").within(&net("10.1.0.0/16")));
        assert!(net("10.0.0.0/8").overlaps(&net("10.1.0.0/16")));
        assert!(!net("192.168.0.0/16").overlaps(&net("10.0.0.0/8")));
        assert!(net("0.0.0.0/0").overlaps(&net("8.8.8.8")));
        assert!(net("2001:db8::1").within(&net("2001:db8::/32")));
        assert!(net("::/0").overlaps(&net("2001:db8::/32")));
    }

    #[test]
    fn families_never_mix_but_mapped_addresses_are_ipv4() {
        assert!(!net("::/0").overlaps(&net("0.0.0.0/0")));
        assert!(net("::ffff:10.0.0.1").within(&net("10.0.0.0/8")));
        assert!(net("::ffff:10.0.0.0/104").within(&net("10.0.0.0/8")));
        assert_eq!(net("::ffff:10.0.0.0/104"), net("10.0.0.0/8"));
        assert!(!net("::ffff:0:0/80").within(&net("0.0.0.0/0")), "a mapped range under /96 stays IPv6");
    }

    #[test]
    fn variants_that_are_not_networks_are_refused() {
        for text in ["010.0.0.0/8", "10.0.0.0/8\n", " 0.0.0.0/0", "0.0.0.0/0 ", "10.0.0.0/8/8"] {
            assert!(Net::parse_lenient(text).is_err(), "{text:?}");
        }
        assert_eq!(net("0.0.0.0/00"), net("0.0.0.0/0"), "a zero-padded prefix is the same network");
    }

    #[test]
    fn refuses_bad_networks() {
        assert!(matches!(Net::parse_lenient("10.0.0.0/33"), Err(CidrError::Prefix(_))));
        assert!(matches!(Net::parse_lenient("10.0.0/8"), Err(CidrError::Syntax(_))));
        assert!(matches!(Net::parse_lenient("10.0.0.0/"), Err(CidrError::Syntax(_))));
        assert!(matches!(Net::parse_lenient("10.0.0.0/+8"), Err(CidrError::Syntax(_))));
        let err = Net::parse_strict("10.0.0.1/8").unwrap_err();
        assert_eq!(err.to_string(), "`10.0.0.1/8` has host bits set; the network is `10.0.0.0/8`");
        assert_eq!(net("10.9.9.9/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("::/0").to_string(), "::/0");
    }
}
