//! IPv4 prefixes: parsing, `except` resolution and the table form an LPM map needs to be exact.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 prefix. Host bits are always zero, so equal prefixes compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: u32,
    len: u8,
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

impl Cidr {
    /// `None` for a length over 32. Host bits are dropped, as Go's `net.ParseCIDR` does for the
    /// network the API server stores.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then(|| Cidr {
            addr: u32::from(addr) & mask(len),
            len,
        })
    }

    pub fn host(addr: Ipv4Addr) -> Self {
        Cidr {
            addr: addr.into(),
            len: 32,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr.into()
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.addr
    }

    /// True when `other` lies inside `self` (or is equal).
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && other.addr & mask(self.len) == self.addr
    }

    fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    fn halves(&self) -> Option<(Cidr, Cidr)> {
        (self.len < 32).then(|| {
            let len = self.len + 1;
            let bit = 1u32 << (32 - len);
            (
                Cidr {
                    addr: self.addr,
                    len,
                },
                Cidr {
                    addr: self.addr | bit,
                    len,
                },
            )
        })
    }

    /// The prefix one bit shorter, `None` for /0.
    pub fn parent(&self) -> Option<Cidr> {
        (self.len > 0).then(|| {
            let len = self.len - 1;
            Cidr {
                addr: self.addr & mask(len),
                len,
            }
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 CIDR")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let err = || CidrError(s.to_string());
        let (a, l) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
        // Leading '+' or zeros are accepted by u8::from_str but not by Go; keep to digits.
        if l.is_empty() || l.len() > 2 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let len: u8 = l.parse().map_err(|_| err())?;
        Cidr::new(addr, len).ok_or_else(err)
    }
}

/// `base` minus the union of `holes`, as the fewest non-overlapping prefixes.
///
/// Splitting only where a hole cuts through keeps the result minimal: a prefix is emitted whole as
/// soon as no hole touches it, and dropped whole as soon as a hole covers it. The output has at
/// most 32 prefixes per hole, ordered by address.
pub fn subtract(base: Cidr, holes: &[Cidr]) -> Vec<Cidr> {
    let mut out = Vec::new();
    let mut stack = vec![base];
    while let Some(p) = stack.pop() {
        let touching: Vec<&Cidr> = holes.iter().filter(|h| h.overlaps(&p)).collect();
        if touching.is_empty() {
            out.push(p);
        } else if touching.iter().any(|h| h.covers(&p)) {
            // Fully inside a hole: nothing of it remains.
        } else if let Some((lo, hi)) = p.halves() {
            // A /32 is always either untouched or covered, so halves() cannot fail here.
            stack.push(hi);
            stack.push(lo);
        }
    }
    out
}

/// Makes a set of (prefix, value) entries exact under longest-prefix match.
///
/// An LPM lookup returns the value of ONE entry — the longest prefix containing the address — so an
/// address inside both 10.0.0.0/8 (port 80) and 10.1.0.0/16 (port 443) would otherwise see only
/// 443. Every entry's value is therefore widened with the values of all entries that cover it;
/// the longest match then carries the union of every entry containing the address, which is what
/// the rules say. No entries are invented: addresses outside every input prefix still miss.
pub fn lpm_closure<V: Clone>(
    entries: impl IntoIterator<Item = (Cidr, V)>,
    mut union: impl FnMut(&mut V, &V),
) -> BTreeMap<Cidr, V> {
    let mut own: BTreeMap<Cidr, V> = BTreeMap::new();
    for (c, v) in entries {
        match own.get_mut(&c) {
            Some(cur) => union(cur, &v),
            None => {
                own.insert(c, v);
            }
        }
    }
    // In (address, length) order every prefix comes after the prefixes covering it, and
    // prefixes either nest or are disjoint: a stack of the enclosing entries gives each entry its
    // nearest covering one, whose value already holds everything above it. Linear, where walking
    // all 32 parents of every entry was not.
    let mut out = BTreeMap::new();
    let mut stack: Vec<(Cidr, V)> = Vec::new();
    for (c, v) in own {
        while stack.last().is_some_and(|(top, _)| !top.covers(&c)) {
            stack.pop();
        }
        let mut acc = v;
        if let Some((_, above)) = stack.last() {
            union(&mut acc, above);
        }
        out.insert(c, acc.clone());
        stack.push((c, acc));
    }
    out
}

/// What a kernel LPM trie returns for `ip`.
pub fn lpm_lookup<V>(table: &BTreeMap<Cidr, V>, ip: Ipv4Addr) -> Option<&V> {
    (0..=32u8)
        .rev()
        .find_map(|len| Cidr::new(ip, len).and_then(|c| table.get(&c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/0",
            "10.0.0.0/+8",
            "a/8",
            "1.2.3.4/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn subtract_is_exact_and_minimal() {
        let out = subtract(c("10.0.0.0/8"), &[c("10.1.0.0/16")]);
        assert_eq!(out.len(), 8);
        assert!(out.iter().all(|p| !p.overlaps(&c("10.1.0.0/16"))));
        assert!(subtract(c("10.0.0.0/8"), &[c("10.0.0.0/8")]).is_empty());
        assert_eq!(subtract(c("10.0.0.0/8"), &[]), vec![c("10.0.0.0/8")]);
        // Brute force over a small space: membership is preserved exactly.
        let base = c("192.168.0.0/24");
        let holes = [
            c("192.168.0.16/28"),
            c("192.168.0.128/25"),
            c("192.168.0.17/32"),
        ];
        let parts = subtract(base, &holes);
        for i in 0..=255u32 {
            let ip = Ipv4Addr::from(0xC0A8_0000 | i);
            let want = !holes.iter().any(|h| h.contains(ip));
            let n = parts.iter().filter(|p| p.contains(ip)).count();
            assert_eq!(n, usize::from(want), "{ip}");
        }
    }

    #[test]
    fn closure_merges_overlapping_values() {
        let t = lpm_closure(
            [
                (c("10.0.0.0/8"), vec![80]),
                (c("10.1.0.0/16"), vec![443]),
                (c("10.1.0.0/16"), vec![8080]),
            ],
            |a, b| a.extend(b.iter().copied()),
        );
        let mut v = lpm_lookup(&t, "10.1.2.3".parse().unwrap()).unwrap().clone();
        v.sort();
        assert_eq!(v, vec![80, 443, 8080]);
        assert_eq!(lpm_lookup(&t, "10.2.0.1".parse().unwrap()), Some(&vec![80]));
        assert_eq!(lpm_lookup(&t, "11.0.0.1".parse().unwrap()), None);
    }

    proptest::proptest! {
        /// Under longest-prefix match, the closure answers every address with the union of all
        /// entries containing it: nested, sibling and disjoint prefixes, duplicates included.
        #[test]
        fn closure_is_exact_under_lpm(
            entries in proptest::collection::vec((0u32..64, 0u8..=8, 0u32..16), 0..40),
            probes in proptest::collection::vec(0u32..256, 32),
        ) {
            // Prefixes of 10.0.0.0/24 (lengths 24..=32) so they overlap often.
            let entries: Vec<(Cidr, u32)> = entries
                .into_iter()
                .map(|(a, l, bit)| {
                    let len = 24 + l;
                    (Cidr::new(Ipv4Addr::from(0x0A00_0000 | (a * 4)), len).unwrap(), 1 << bit)
                })
                .collect();
            let t = lpm_closure(entries.iter().copied(), |a, b| *a |= *b);
            for p in probes {
                let ip = Ipv4Addr::from(0x0A00_0000 | p);
                let want = entries
                    .iter()
                    .filter(|(c, _)| c.contains(ip))
                    .fold(None, |acc: Option<u32>, (_, v)| Some(acc.unwrap_or(0) | v));
                proptest::prop_assert_eq!(lpm_lookup(&t, ip).copied(), want, "{}", ip);
            }
        }
    }
}
