//! Coordinator addresses as people type them: `host:port` (what the coordinator prints
//! and writes to `--addr-file`), or a URL `http://host:port` / `https://host:port`.
//! A malformed address is refused at once, naming what was expected, instead of being
//! retried as if the coordinator were merely not up yet.

/// The URL for `addr`, or why it is not a coordinator address.
pub fn coordinator_url(addr: &str) -> Result<String, String> {
    let a = addr.trim();
    let expected = "expected host:port or http://host:port, e.g. 127.0.0.1:50051";
    let (scheme, rest) = match a.split_once("://") {
        Some((s, r)) if s == "http" || s == "https" => (s, r),
        Some((s, _)) => {
            return Err(format!(
            "`{addr}` is not a coordinator address: scheme `{s}` is not http or https ({expected})"
        ))
        }
        None => ("http", a),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') || hostport.is_empty() {
        return Err(format!(
            "`{addr}` is not a coordinator address ({expected})"
        ));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') || h.starts_with('[') => (h, p),
        _ => {
            return Err(format!(
                "`{addr}` is not a coordinator address: it has no port ({expected})"
            ))
        }
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "`{addr}` is not a coordinator address: `{port}` is not a port number 1–65535 ({expected})"
        ));
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[') {
        v6.strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        host.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    if !host_ok {
        return Err(format!(
            "`{addr}` is not a coordinator address: `{host}` is not a host name or IP address ({expected})"
        ));
    }
    Ok(format!("{scheme}://{hostport}"))
}

#[cfg(test)]
mod tests {
    use super::coordinator_url;

    #[test]
    fn what_the_coordinator_prints_is_accepted() {
        assert_eq!(
            coordinator_url("127.0.0.1:43175").unwrap(),
            "http://127.0.0.1:43175"
        );
        assert_eq!(
            coordinator_url("http://localhost:50051/").unwrap(),
            "http://localhost:50051"
        );
        assert_eq!(
            coordinator_url("https://coord.gpo.svc:443").unwrap(),
            "https://coord.gpo.svc:443"
        );
        assert_eq!(coordinator_url("[::1]:7000").unwrap(), "http://[::1]:7000");
    }

    #[test]
    fn malformed_addresses_say_what_was_expected() {
        for bad in [
            "notaurl",
            "http://",
            "ftp://host:1",
            "host:port",
            "host:0",
            "ho st:80",
            "http://h:1/path",
        ] {
            let e = coordinator_url(bad).unwrap_err();
            assert!(e.contains("expected host:port"), "{bad}: {e}");
        }
    }
}
