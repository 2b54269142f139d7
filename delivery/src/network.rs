//! Addresses the worker must never connect to (pipeline.blocked_networks).
//!
//! The check is made on the addresses a host name resolves to, in the
//! resolver the HTTP client connects with: a name that resolves to a
//! blocked address cannot reach it, whatever it resolved to before (DNS
//! rebinding). Blocked addresses are dropped from the answer; when nothing
//! is left, the request fails with Blocked and is not retried. IPv4 addresses
//! written as IPv6 (::ffff:a.b.c.d) are checked as IPv4. With a proxy, the
//! proxy's address is what is checked: the proxy resolves the rest.
//!
//! ureq asks its resolver before every request, pooled connection or not,
//! and its resolver starts a thread for each lookup that has a timeout
//! (every one of ours). So an address written in the URL is taken as is,
//! and a name's addresses are kept for a few seconds: the blocked ranges are
//! still checked on every request.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// The default of pipeline.blocked_networks: "this" network, link-local
/// (where cloud metadata services answer: 169.254.169.254, fd00:ec2::254),
/// Alibaba's metadata address, multicast and broadcast. Loopback and
/// private ranges stay allowed: receivers often run there.
pub const DEFAULT_BLOCKED: &CStr = c"0.0.0.0/8, 169.254.0.0/16, 100.100.100.200/32, 224.0.0.0/4, \
     255.255.255.255/32, ::/128, fe80::/10, fd00:ec2::254/128, ff00::/8";

/// One address range, such as 169.254.0.0/16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// An IPv4 address written as IPv6 is checked as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Parses a comma-separated list of addresses and ranges (a bare address
/// is a range of one); an error names the entry that is wrong.
pub fn parse_networks(list: &str) -> Result<Vec<Network>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (address, prefix) = match entry.split_once('/') {
                Some((address, prefix)) => (address, Some(prefix)),
                None => (entry, None),
            };
            let address: IpAddr = address.trim().parse().map_err(|_| {
                format!("{entry:?} is not an IP address or range (such as 169.254.0.0/16)")
            })?;
            let address = canonical(address);
            let longest = if address.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => longest,
                Some(prefix) => prefix
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= longest)
                    .ok_or_else(|| format!("{entry:?} has a prefix length outside 0-{longest}"))?,
            };
            Ok(Network { address, prefix })
        })
        .collect()
}

/// The error of a request whose host resolved to blocked addresses only.
#[derive(Debug)]
pub struct Blocked(pub String);

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Blocked {}

/// How long the addresses a name resolved to are used again.
const NAME_KEPT: Duration = Duration::from_secs(5);

/// The system resolver, less the blocked addresses.
#[derive(Debug)]
pub struct GuardedResolver {
    blocked: Arc<Vec<Network>>,
    inner: DefaultResolver,
    /// "host:port" -> when it was looked up, and its addresses.
    names: Mutex<HashMap<String, (Instant, Vec<SocketAddr>)>>,
}

impl GuardedResolver {
    pub fn new(blocked: Vec<Network>) -> GuardedResolver {
        GuardedResolver {
            blocked: Arc::new(blocked),
            inner: DefaultResolver::default(),
            names: Mutex::new(HashMap::new()),
        }
    }

    fn blocked_by(&self, address: &SocketAddr) -> Option<&Network> {
        self.blocked.iter().find(|net| net.contains(address.ip()))
    }

    /// The addresses of the URI's host: an IP address as written, a name's
    /// from `lookup` at most once every NAME_KEPT.
    fn addresses(
        &self,
        uri: &Uri,
        lookup: impl FnOnce() -> Result<ResolvedSocketAddrs, ureq::Error>,
    ) -> Result<Vec<SocketAddr>, ureq::Error> {
        // "host:port" as ureq's resolver would look it up.
        let key = uri
            .scheme()
            .zip(uri.authority())
            .and_then(|(scheme, authority)| DefaultResolver::host_and_port(scheme, authority));
        let Some(key) = key else {
            // Not a URL ureq can send to: its own resolver says why.
            return Ok(lookup()?.iter().copied().collect());
        };
        if let Ok(address) = key.parse::<SocketAddr>() {
            return Ok(vec![address]);
        }
        let now = Instant::now();
        let names = || self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, addresses)) = names().get(&key) {
            if now.duration_since(*at) < NAME_KEPT {
                return Ok(addresses.clone());
            }
        }
        let addresses: Vec<SocketAddr> = lookup()?.iter().copied().collect();
        let mut names = names();
        names.retain(|_, (at, _)| now.duration_since(*at) < NAME_KEPT);
        names.insert(key, (now, addresses.clone()));
        Ok(addresses)
    }
}

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.addresses(uri, || self.inner.resolve(uri, config, timeout))?;
        let mut allowed = self.empty();
        let mut refused = Vec::new();
        for address in resolved {
            match self.blocked_by(&address) {
                Some(network) => refused.push(format!("{} (in {network})", address.ip())),
                // NB: at most as many as ureq's resolver gives (or one).
                None => allowed.push(address),
            }
        }
        if allowed.is_empty() && !refused.is_empty() {
            let host = uri.host().unwrap_or_default();
            return Err(ureq::Error::Other(Box::new(Blocked(format!(
                "not sent: {host} resolves to {} only, which pipeline.blocked_networks refuses",
                refused.join(", ")
            )))));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_blocks_metadata_and_link_local_but_not_loopback() {
        let blocked = parse_networks(DEFAULT_BLOCKED.to_str().unwrap()).unwrap();
        let is_blocked = |text: &str| blocked.iter().any(|n| n.contains(ip(text)));
        for address in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "fe80::1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(is_blocked(address), "{address}");
        }
        for address in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.1.1",
            "93.184.216.34",
            "2001:db8::1",
        ] {
            assert!(!is_blocked(address), "{address}");
        }
    }

    #[test]
    fn addresses_in_the_url_need_no_lookup_and_names_are_kept_a_while() {
        let resolver = GuardedResolver::new(Vec::new());
        let never = || -> Result<ResolvedSocketAddrs, ureq::Error> { panic!("looked up") };
        let uri = |text: &str| text.parse::<Uri>().unwrap();
        assert_eq!(
            resolver
                .addresses(&uri("http://127.0.0.1:8080/x"), never)
                .unwrap(),
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolver.addresses(&uri("https://[::1]/x"), never).unwrap(),
            vec!["[::1]:443".parse::<SocketAddr>().unwrap()]
        );
        let lookups = std::cell::Cell::new(0);
        let lookup = || {
            lookups.set(lookups.get() + 1);
            let mut found = resolver.empty();
            found.push("10.1.2.3:80".parse().unwrap());
            Ok(found)
        };
        for _ in 0..3 {
            assert_eq!(
                resolver
                    .addresses(&uri("http://hooks.example/a"), lookup)
                    .unwrap(),
                vec!["10.1.2.3:80".parse::<SocketAddr>().unwrap()]
            );
        }
        assert_eq!(lookups.get(), 1, "one lookup for three requests");
        // Another port is another entry; an old entry is looked up again.
        resolver
            .addresses(&uri("http://hooks.example:81/a"), lookup)
            .unwrap();
        assert_eq!(lookups.get(), 2);
        for (at, _) in resolver.names.lock().unwrap().values_mut() {
            *at -= NAME_KEPT;
        }
        resolver
            .addresses(&uri("http://hooks.example/a"), lookup)
            .unwrap();
        assert_eq!(lookups.get(), 3);
    }

    #[test]
    fn a_blocked_address_in_the_url_is_refused() {
        let resolver = GuardedResolver::new(parse_networks("169.254.0.0/16").unwrap());
        let config = ureq::Agent::config_builder().build();
        let timeout = NextTimeout {
            after: Duration::from_secs(1).into(),
            reason: ureq::Timeout::Resolve,
            ..NextTimeout::default()
        };
        let uri: Uri = "http://169.254.169.254/latest".parse().unwrap();
        let error = resolver.resolve(&uri, &config, timeout).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("169.254.169.254 (in 169.254.0.0/16)"),
            "{error}"
        );
        let uri: Uri = "http://127.0.0.1:9/".parse().unwrap();
        let found = resolver.resolve(&uri, &config, timeout).unwrap();
        assert_eq!(
            found.to_vec(),
            vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn ranges_parse_and_bad_entries_are_named() {
        let nets = parse_networks(" 10.0.0.0/8 ,192.168.1.7, 2001:db8::/32,").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(ip("10.255.0.1")));
        assert!(!nets[0].contains(ip("11.0.0.1")));
        assert!(nets[1].contains(ip("192.168.1.7")) && !nets[1].contains(ip("192.168.1.8")));
        assert!(nets[2].contains(ip("2001:db8:ffff::1")));
        assert_eq!(
            parse_networks("0.0.0.0/0").unwrap()[0].to_string(),
            "0.0.0.0/0"
        );
        assert!(parse_networks("0.0.0.0/0").unwrap()[0].contains(ip("8.8.8.8")));
        assert!(parse_networks("").unwrap().is_empty());
        let error = parse_networks("10.0.0.0/8, example.com").unwrap_err();
        assert!(
            error.contains("\"example.com\" is not an IP address"),
            "{error}"
        );
        let error = parse_networks("10.0.0.0/33").unwrap_err();
        assert!(error.contains("prefix length outside 0-32"), "{error}");
    }
}
