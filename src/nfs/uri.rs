//! `nfs://` URIs, parsed by ringvm (libnfs 4 cannot take a port).

use super::NfsError;

/// `nfs://SERVER[:PORT]/EXPORT/.../FILE[?OPTIONS]`, parsed here rather
/// than by libnfs: libnfs 4 takes no `:PORT` (it would look `host:port` up
/// as a host name), so the port becomes its `nfsport=` option; `[v6]`
/// addresses keep their brackets for libnfs and lose them for lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsUri {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    pub port: Option<u16>,
    /// The directory holding the file, from the export's root (`/export/dir`).
    pub dir: String,
    pub file: String,
    /// libnfs URL options, in order, `nfsport` included if given that way.
    pub options: Vec<(String, String)>,
}

impl NfsUri {
    pub fn parse(uri: &str) -> Result<NfsUri, NfsError> {
        let bad = |why: &str| NfsError::BadUri { uri: uri.to_string(), reason: why.to_string() };
        let rest = uri.strip_prefix("nfs://").ok_or_else(|| bad("not an nfs:// URI"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let slash = rest.find('/').ok_or_else(|| bad("no path"))?;
        let (authority, path) = rest.split_at(slash);
        if authority.contains('@') {
            return Err(bad("user names in the URI are not supported (use ?uid=N&gid=N)"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '[' in the server address"))?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no server"));
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')) {
            return Err(bad("bad character in the server name"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(bad(&format!("port '{p}' is not a number from 1 to 65535"))),
            },
        };
        let (dir, file) = path.rsplit_once('/').ok_or_else(|| bad("no path"))?;
        if file.is_empty() || file == "." || file == ".." {
            return Err(bad("no file name"));
        }
        if dir.is_empty() {
            return Err(bad("no export (the file must be inside an exported directory)"));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(bad("'..' in the path"));
        }
        let mut options = Vec::new();
        for kv in query.unwrap_or_default().split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(&format!("option '{kv}' has no value")))?;
            options.push((k.to_string(), v.to_string()));
        }
        if let (Some(p), Some((_, v))) = (port, options.iter().find(|(k, _)| k == "nfsport")) {
            if v.parse::<u16>().ok() != Some(p) {
                return Err(bad(&format!("port {p} and nfsport={v} disagree")));
            }
        }
        Ok(NfsUri { host: host.to_string(), port, dir: dir.to_string(), file: file.to_string(), options })
    }

    /// The same file under another name in its directory.
    pub fn with_file(&self, file: &str) -> NfsUri {
        NfsUri { file: file.to_string(), ..self.clone() }
    }

    pub(super) fn option(&self, key: &str) -> Option<&str> {
        self.options.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The URL libnfs is given: no port in the authority, `nfsport=`
    /// instead.
    pub fn libnfs_url(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let mut opts: Vec<String> = self.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let (Some(p), None) = (self.port, self.option("nfsport")) {
            opts.push(format!("nfsport={p}"));
        }
        let q = if opts.is_empty() { String::new() } else { format!("?{}", opts.join("&")) };
        format!("nfs://{host}{}/{}{q}", self.dir, self.file)
    }
}

impl std::fmt::Display for NfsUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        let opts: Vec<String> = self.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let q = if opts.is_empty() { String::new() } else { format!("?{}", opts.join("&")) };
        write!(f, "nfs://{host}{port}{}/{}{q}", self.dir, self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::NfsUri;
    use crate::nfs::NfsError;

    #[test]
    fn a_port_becomes_libnfs_nfsport() {
        let u = NfsUri::parse("nfs://srv:2049/export/dir/vm.state?mountport=20048").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.dir.as_str(), u.file.as_str()), ("srv", Some(2049), "/export/dir", "vm.state"));
        assert_eq!(u.libnfs_url(), "nfs://srv/export/dir/vm.state?mountport=20048&nfsport=2049");
        assert_eq!(u.to_string(), "nfs://srv:2049/export/dir/vm.state?mountport=20048");
        let plain = NfsUri::parse("nfs://10.0.0.1/export/vm.state").unwrap();
        assert_eq!(plain.port, None);
        assert_eq!(plain.libnfs_url(), "nfs://10.0.0.1/export/vm.state");
        // Both spellings of the same port agree; different ones do not.
        assert!(NfsUri::parse("nfs://srv:2049/e/f?nfsport=2049").is_ok());
        assert!(matches!(NfsUri::parse("nfs://srv:2049/e/f?nfsport=2050"), Err(NfsError::BadUri { reason, .. }) if reason.contains("disagree")));
    }

    #[test]
    fn ipv6_addresses_keep_brackets_for_libnfs_only() {
        let u = NfsUri::parse("nfs://[fd00::1]:2049/export/f").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", Some(2049)));
        assert_eq!(u.libnfs_url(), "nfs://[fd00::1]/export/f?nfsport=2049");
        assert_eq!(NfsUri::parse("nfs://[fd00::1]/export/f").unwrap().port, None);
    }

    #[test]
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("nfs://srv:0/e/f", "port '0'"),
            ("nfs://srv:99999/e/f", "port '99999'"),
            ("nfs://srv:x/e/f", "port 'x'"),
            ("nfs://:2049/e/f", "no server"),
            ("nfs://srv", "no path"),
            ("nfs://srv/e/", "no file name"),
            ("nfs://srv/f", "no export"),
            ("nfs://srv/e/../f", "'..'"),
            ("nfs://u@srv/e/f", "user names"),
            ("nfs://[fd00::1/e/f", "unclosed"),
            ("nfs://srv/e/f?uid", "no value"),
            ("file:/x", "not an nfs://"),
        ] {
            let e = NfsUri::parse(uri).unwrap_err();
            assert!(matches!(&e, NfsError::BadUri { uri: u, reason } if u == uri && reason.contains(why)), "{uri}: {e:?}");
            assert!(e.to_string().starts_with(uri), "{uri}: {e}");
        }
    }

    #[test]
    fn with_file_keeps_server_port_and_options() {
        let u = NfsUri::parse("nfs://srv:2049/export/vm.state?uid=0").unwrap();
        assert_eq!(u.with_file(".vm.state.tmp").to_string(), "nfs://srv:2049/export/.vm.state.tmp?uid=0");
    }
}
