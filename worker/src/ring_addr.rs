//! The ring address a worker advertises to its peers, which is not always the one it binds:
//! a listener on `0.0.0.0` must advertise an address the other machines can route to, and a
//! loopback one only works when every worker is on this host. Deciding is pure (this
//! module); finding the interface that routes to the coordinator is one socket call
//! ([`route_to`]).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// What to advertise, and a warning when the choice cannot work for a multi-host run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub address: String,
    pub warning: Option<String>,
}

/// The address to advertise for a ring listener bound at `bound`.
/// - `advertise` (`--ring-advertise`): `HOST` (the bound port is added) or `HOST:PORT`;
/// - else a listener on every interface advertises `route` (this host's address on the
///   route to the coordinator), with the bound port;
/// - else the bound address itself, with a warning when it is loopback and the coordinator
///   is not (the other workers are then elsewhere and cannot connect).
pub fn advertised(
    bound: SocketAddr,
    advertise: Option<&str>,
    coordinator_host: &str,
    route: Option<IpAddr>,
) -> Result<Advertised, String> {
    if let Some(a) = advertise.map(str::trim).filter(|a| !a.is_empty()) {
        let has_port = match a.rsplit_once(':') {
            Some((h, p)) => {
                !h.is_empty() && p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
            }
            None => false,
        };
        let address = if has_port {
            a.to_string()
        } else if a.contains(':') && !a.starts_with('[') {
            format!("[{a}]:{}", bound.port())
        } else {
            format!("{a}:{}", bound.port())
        };
        if address.contains('/') || address.contains(' ') {
            return Err(format!(
                "--ring-advertise `{a}`: expected HOST or HOST:PORT, e.g. 10.0.0.7 or worker-0.gpo:29500"
            ));
        }
        return Ok(Advertised {
            address,
            warning: None,
        });
    }
    let coordinator_local = is_loopback_host(coordinator_host);
    if bound.ip().is_unspecified() {
        let ip = match route {
            Some(ip) => ip,
            None if coordinator_local => IpAddr::from([127, 0, 0, 1]),
            None => {
                return Err(format!(
                    "the ring listens on {bound} but no route to the coordinator `{coordinator_host}` was found to tell peers where: pass --ring-advertise HOST"
                ))
            }
        };
        return Ok(Advertised {
            address: SocketAddr::new(ip, bound.port()).to_string(),
            warning: None,
        });
    }
    let warning = (bound.ip().is_loopback() && !coordinator_local).then(|| {
        format!(
            "the ring listens on loopback ({bound}) but the coordinator `{coordinator_host}` is on another host: workers on other machines cannot connect; pass --ring-bind 0.0.0.0:PORT (and --ring-advertise HOST if the route to the coordinator is not the one peers use)"
        )
    });
    Ok(Advertised {
        address: bound.to_string(),
        warning,
    })
}

/// Whether a host name or IP is this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of a coordinator URL (`http://host:port`).
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.trim_end_matches('/');
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

/// This host's address on the route to `host:port`: a UDP socket "connected" there picks the
/// outgoing interface without sending anything.
pub fn route_to(host: &str, port: u16) -> Option<IpAddr> {
    let target = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .ok()?
        .next()?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(target).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_explicit_advertise_wins_and_gets_the_bound_port() {
        let a = advertised(bound("0.0.0.0:29500"), Some("10.0.0.7"), "coord", None).unwrap();
        assert_eq!(a.address, "10.0.0.7:29500");
        let a = advertised(bound("0.0.0.0:1"), Some("w-0.gpo:4000"), "coord", None).unwrap();
        assert_eq!(a.address, "w-0.gpo:4000");
        let a = advertised(bound("[::]:7"), Some("fd00::1"), "coord", None).unwrap();
        assert_eq!(a.address, "[fd00::1]:7");
        assert!(advertised(bound("0.0.0.0:1"), Some("http://x/"), "c", None).is_err());
    }

    #[test]
    fn every_interface_advertises_the_route_to_the_coordinator() {
        let route = Some("192.168.1.20".parse().unwrap());
        let a = advertised(bound("0.0.0.0:5000"), None, "192.168.1.2", route).unwrap();
        assert_eq!(a.address, "192.168.1.20:5000");
        assert!(a.warning.is_none());
        let e = advertised(bound("0.0.0.0:5000"), None, "coord.example", None).unwrap_err();
        assert!(e.contains("--ring-advertise"), "{e}");
        let a = advertised(bound("0.0.0.0:5000"), None, "localhost", None).unwrap();
        assert_eq!(a.address, "127.0.0.1:5000");
    }

    #[test]
    fn loopback_with_a_remote_coordinator_warns() {
        let a = advertised(bound("127.0.0.1:5000"), None, "10.1.2.3", None).unwrap();
        assert_eq!(a.address, "127.0.0.1:5000");
        assert!(a.warning.unwrap().contains("--ring-bind 0.0.0.0"));
        let a = advertised(bound("127.0.0.1:5000"), None, "127.0.0.1", None).unwrap();
        assert!(a.warning.is_none());
        assert!(advertised(bound("127.0.0.1:5000"), None, "localhost", None)
            .unwrap()
            .warning
            .is_none());
    }

    #[test]
    fn hosts_of_urls_and_the_route_probe() {
        assert_eq!(url_host("http://10.0.0.1:50051"), "10.0.0.1");
        assert_eq!(url_host("https://[::1]:443/"), "[::1]");
        assert!(is_loopback_host("[::1]") && is_loopback_host("LOCALHOST"));
        assert_eq!(route_to("127.0.0.1", 9), Some("127.0.0.1".parse().unwrap()));
    }
}
