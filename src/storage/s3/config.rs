//! Where and how to reach a bucket: [`S3Config`], read from the AWS variables the SDKs read,
//! and what [`S3Storage::new`](super::S3Storage::new) makes of it before the first request.
//!
//! Three things are settled here, once, so that a wrong setting fails at start with the
//! variable to fix rather than at the first upload: the bucket's URL (the endpoint, AWS's
//! for the region when none is given, virtual-hosted or path-style: [`Addressing`]); the
//! prefix, which must not hold segments a store would read differently ([`check_prefix`]);
//! and the certificates an `https://` endpoint must chain to ([`CaRoots`]: a bundle named
//! by a variable, else the system's trust store, else the roots built into walsync). The
//! credentials themselves come from [`credentials::resolve`], the AWS SDKs' chain.

use std::fmt;
use std::time::Duration;

use url::Url;

use crate::error::{Error, Result};
use crate::storage::credentials;
use crate::storage::sigv4::Bucket;

/// How long one read or one write on an S3 connection may block before the request fails
/// (and is retried): the default of `--s3-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where operating systems keep their trust store as one PEM bundle, the first found is used
/// (the list of Go's crypto/x509 and of rustls-native-certs).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL, CentOS
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // RHEL, CentOS
    "/etc/ssl/cert.pem",                  // macOS, OpenBSD, Alpine
    "/usr/local/share/certs/ca-root-nss.crt", // FreeBSD
];

/// How bucket URLs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    /// Virtual-hosted for AWS (path style for bucket names with dots, which the wildcard
    /// certificate does not cover), path style for a custom endpoint.
    #[default]
    Auto,
    /// `https://bucket.host/key`.
    Virtual,
    /// `https://host/bucket/key`.
    Path,
}

/// The certificates an `https://` endpoint's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CaRoots {
    /// The Mozilla roots compiled into walsync (webpki-roots).
    #[default]
    BuiltIn,
    /// The system's trust store: this PEM bundle.
    System(std::path::PathBuf),
    /// The PEM files and directories named by these variables (`AWS_CA_BUNDLE`, or
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`), in place of any other roots.
    Named(Vec<(&'static str, std::path::PathBuf)>),
}

impl CaRoots {
    /// For messages: where the roots come from.
    pub(super) fn describe(&self) -> String {
        match self {
            CaRoots::BuiltIn => "walsync's built-in roots".to_string(),
            CaRoots::System(path) => format!("the system's roots ({})", path.display()),
            CaRoots::Named(named) => named
                .iter()
                .map(|(var, path)| format!("{var}={}", path.display()))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Where and how to reach an S3 bucket.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every key with a `/`; empty for the bucket's root.
    pub prefix: String,
    /// `None` for AWS (`https://s3.<region>.amazonaws.com`, or `.amazonaws.com.cn` for the
    /// `cn-` regions); anything else is a custom endpoint (MinIO, R2, a test server).
    pub endpoint: Option<String>,
    /// `WALSYNC_S3_ADDRESSING`: virtual-hosted or path-style bucket URLs.
    pub addressing: Addressing,
    pub region: String,
    /// Keys that do not change (empty when `credential_source` gives them).
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Where temporary keys are asked for, and asked again before they expire (see
    /// [`credentials`]); `None` for the keys above.
    pub credential_source: Option<credentials::Source>,
    /// Where the keys come from, for the log line at start and for messages ("the
    /// environment", a profile, ...); empty for keys given by a program.
    pub credential_origin: String,
    /// Longest wait for one read or write on a connection ([`DEFAULT_TIMEOUT`] unless set):
    /// a server that stops answering mid-request fails the attempt after this long, and the
    /// request is retried, instead of hanging an upload worker.
    pub timeout: Duration,
    /// What an `https://` endpoint's certificate must chain to.
    pub ca_roots: CaRoots,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("addressing", &self.addressing)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("credential_source", &self.credential_source)
            .field("secret_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("ca_roots", &self.ca_roots)
            .finish()
    }
}

impl S3Config {
    /// Configuration from the usual AWS variables: credentials from the chain of
    /// [`credentials::resolve`] (the environment's `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` first), `AWS_REGION` (else
    /// `AWS_DEFAULT_REGION`, else the profile's region, else `us-east-1`), and
    /// `AWS_ENDPOINT_URL_S3` (else `AWS_ENDPOINT_URL`) unless `endpoint_flag` gives the
    /// endpoint; `WALSYNC_S3_ADDRESSING` (`virtual` or `path`); for `https://`,
    /// `AWS_CA_BUNDLE`, else `SSL_CERT_FILE` and `SSL_CERT_DIR`, else the system's trust
    /// store if there is one, else the built-in roots. Empty variables count as unset.
    pub fn from_env(bucket: &str, prefix: &str, endpoint_flag: Option<&str>) -> Result<S3Config> {
        let system = SYSTEM_BUNDLES
            .iter()
            .map(std::path::Path::new)
            .find(|path| path.is_file())
            .map(std::path::Path::to_path_buf);
        S3Config::from_vars(
            bucket,
            prefix,
            endpoint_flag,
            |name| std::env::var(name).ok(),
            system,
        )
    }

    pub(super) fn from_vars(
        bucket: &str,
        prefix: &str,
        endpoint_flag: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
        system_bundle: Option<std::path::PathBuf>,
    ) -> Result<S3Config> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let chain = credentials::resolve(&var, "us-east-1")?;
        let keys = chain.keys.clone();
        let endpoint = endpoint_flag
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .or_else(|| var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| var("AWS_ENDPOINT_URL"));
        let addressing = match var("WALSYNC_S3_ADDRESSING").as_deref() {
            None => Addressing::Auto,
            Some("virtual") => Addressing::Virtual,
            Some("path") => Addressing::Path,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "WALSYNC_S3_ADDRESSING={other:?} is not valid: use \"virtual\" or \"path\""
                )))
            }
        };
        let ca_roots = if let Some(bundle) = var("AWS_CA_BUNDLE") {
            CaRoots::Named(vec![("AWS_CA_BUNDLE", bundle.into())])
        } else {
            let mut named = Vec::new();
            if let Some(file) = var("SSL_CERT_FILE") {
                named.push(("SSL_CERT_FILE", file.into()));
            }
            if let Some(dirs) = var("SSL_CERT_DIR") {
                // A list, like PATH, as OpenSSL reads it.
                for dir in dirs.split(':').filter(|d| !d.is_empty()) {
                    named.push(("SSL_CERT_DIR", dir.into()));
                }
            }
            match (named.is_empty(), system_bundle) {
                (false, _) => CaRoots::Named(named),
                (true, Some(system)) => CaRoots::System(system),
                (true, None) => CaRoots::BuiltIn,
            }
        };
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            addressing,
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .or(chain.profile_region)
                .unwrap_or_else(|| "us-east-1".to_string()),
            access_key: keys.as_ref().map(|k| k.key.clone()).unwrap_or_default(),
            secret_key: keys.as_ref().map(|k| k.secret.clone()).unwrap_or_default(),
            session_token: keys.and_then(|k| k.token),
            credential_source: chain.source,
            credential_origin: chain.origin,
            timeout: DEFAULT_TIMEOUT,
            ca_roots,
        })
    }
}

/// The AWS endpoint of `region`: `.amazonaws.com.cn` for the China regions.
fn aws_endpoint(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("https://s3.{region}.amazonaws.com.cn")
    } else {
        format!("https://s3.{region}.amazonaws.com")
    }
}

/// Why a prefix cannot be used, if it cannot: empty, `.` and `..` segments would be
/// normalised away in request paths (the object stored under another key than the one
/// listed), or read differently by each store.
pub fn check_prefix(prefix: &str) -> std::result::Result<(), &'static str> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.contains(['\\', '\0']) {
        return Err("the prefix must not contain '\\' or NUL");
    }
    if prefix
        .split('/')
        .any(|part| matches!(part, "" | "." | ".."))
    {
        return Err("the prefix must not contain empty, '.' or '..' segments");
    }
    Ok(())
}

/// The bucket `name` in `region`, at `endpoint` (AWS's for the region if `None`).
pub(super) fn make_bucket(
    endpoint: Option<&str>,
    addressing: Addressing,
    name: &str,
    region: &str,
) -> Result<Bucket> {
    let endpoint_text = endpoint.map_or_else(|| aws_endpoint(region), str::to_string);
    let path_style = match addressing {
        Addressing::Path => true,
        Addressing::Virtual => false,
        Addressing::Auto => endpoint.is_some() || name.contains('.'),
    };
    let bad_endpoint = |why: String| {
        Error::invalid(format!(
            "s3://{name}: invalid S3 endpoint {endpoint_text:?}: {why} (expected http://host:port or https://host)"
        ))
    };
    let url: Url = endpoint_text
        .parse()
        .map_err(|e| bad_endpoint(format!("{e}")))?;
    Bucket::new(url, path_style, name.to_string(), region.to_string())
        .map_err(|e| bad_endpoint(format!("{e:?}")))
}

/// The root certificates of `roots`, or `None` for the built-in ones. A system store that
/// cannot be read falls back to the built-in roots; a file or directory a variable names
/// must hold certificates.
pub(super) fn load_roots(roots: &CaRoots) -> Result<Option<Vec<ureq::tls::Certificate<'static>>>> {
    let parse = |pem: &[u8]| -> Vec<ureq::tls::Certificate<'static>> {
        ureq::tls::parse_pem(pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect()
    };
    match roots {
        CaRoots::BuiltIn => Ok(None),
        CaRoots::System(path) => {
            let certs = std::fs::read(path)
                .map(|pem| parse(&pem))
                .unwrap_or_default();
            if certs.is_empty() {
                log::warn!(
                    "no certificates read from the system's trust store {}; using walsync's built-in roots",
                    path.display()
                );
                return Ok(None);
            }
            Ok(Some(certs))
        }
        CaRoots::Named(named) => {
            let mut all = Vec::new();
            for (var, path) in named {
                let bad = |why: String| Error::invalid(format!("{var}={}: {why}", path.display()));
                let certs = if *var == "SSL_CERT_DIR" {
                    // Every file of each directory (OpenSSL's hashed names are links to
                    // them); as OpenSSL does, a directory of the list that is not there is
                    // skipped, and only finding no certificate at all is an error.
                    let Ok(entries) = std::fs::read_dir(path) else {
                        log::debug!("{var}: no directory {}", path.display());
                        continue;
                    };
                    for entry in entries.flatten() {
                        if let Ok(pem) = std::fs::read(entry.path()) {
                            all.extend(parse(&pem));
                        }
                    }
                    continue;
                } else {
                    let pem = std::fs::read(path)
                        .map_err(|e| bad(format!("cannot read the certificate file: {e}")))?;
                    parse(&pem)
                };
                if certs.is_empty() {
                    return Err(bad("no PEM certificate found there".to_string()));
                }
                all.extend(certs);
            }
            if all.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: no PEM certificate found there",
                    roots.describe()
                )));
            }
            Ok(Some(all))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::storage::s3::tests::{config, object_url, vars, KEYS};
    use crate::storage::s3::S3Storage;

    #[test]
    fn config_from_vars_defaults_and_precedence() {
        let c = S3Config::from_vars("b", "/p/q/", None, vars(&KEYS), None).unwrap();
        assert_eq!(c.bucket, "b");
        assert_eq!(c.prefix, "p/q");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.session_token, None);

        let mut all = KEYS.to_vec();
        all.extend([
            ("AWS_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL_S3", "http://env:9000"),
            ("AWS_SESSION_TOKEN", "tok-tok"),
        ]);
        let c = S3Config::from_vars("b", "", None, vars(&all), None).unwrap();
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.endpoint.as_deref(), Some("http://env:9000"));
        assert_eq!(c.session_token.as_deref(), Some("tok-tok"));
        let c = S3Config::from_vars("b", "", Some("http://flag:1"), vars(&all), None).unwrap();
        assert_eq!(
            c.endpoint.as_deref(),
            Some("http://flag:1"),
            "the flag wins"
        );
    }

    #[test]
    fn config_takes_credentials_from_the_chain() {
        for list in [&KEYS[..1], &KEYS[1..]] {
            let err = S3Config::from_vars("b", "", None, vars(list), None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid);
            assert_eq!(
                err.to_string(),
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (only one is)"
            );
        }
        // With nothing else, the end of the chain: the instance role, asked at the first
        // request.
        let c = S3Config::from_vars("b", "", None, vars(&[]), None).unwrap();
        assert_eq!(c.access_key, "");
        assert!(matches!(
            c.credential_source,
            Some(credentials::Source::Imds { .. })
        ));
        let c = S3Config::from_vars("b", "", None, vars(&KEYS), None).unwrap();
        assert_eq!(c.credential_source, None);
        assert_eq!(c.credential_origin, "the environment (AWS_ACCESS_KEY_ID)");
    }

    #[test]
    fn config_debug_hides_secrets() {
        let mut all = KEYS.to_vec();
        all.push(("AWS_SESSION_TOKEN", "tok-tok-secret"));
        let c = S3Config::from_vars("b", "", None, vars(&all), None).unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("tok-tok-secret"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        let storage = S3Storage::new(c).unwrap();
        let shown = format!("{storage:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("tok-tok-secret"), "{shown}");
    }

    #[test]
    fn addressing_setting_and_china_regions() {
        let with = |list: &[(&str, &str)], endpoint: Option<&str>| {
            Ok::<_, Error>(object_url(&S3Storage::new(config(list, endpoint)?)?, "k"))
        };
        // Defaults: virtual-hosted for AWS, path style for a custom endpoint.
        assert_eq!(
            with(&[], None).unwrap(),
            "https://b.s3.us-east-1.amazonaws.com/k"
        );
        assert_eq!(
            with(&[], Some("https://minio.example:9000")).unwrap(),
            "https://minio.example:9000/b/k"
        );
        let virtual_ = [("WALSYNC_S3_ADDRESSING", "virtual")];
        assert_eq!(
            with(&virtual_, Some("https://minio.example:9000")).unwrap(),
            "https://b.minio.example:9000/k"
        );
        let path = [("WALSYNC_S3_ADDRESSING", "path")];
        assert_eq!(
            with(&path, None).unwrap(),
            "https://s3.us-east-1.amazonaws.com/b/k"
        );
        assert_eq!(
            with(&[("AWS_REGION", "cn-north-1")], None).unwrap(),
            "https://b.s3.cn-north-1.amazonaws.com.cn/k"
        );
        assert_eq!(
            with(&[("AWS_REGION", "cn-northwest-1")], None).unwrap(),
            "https://b.s3.cn-northwest-1.amazonaws.com.cn/k"
        );
        let err = with(&[("WALSYNC_S3_ADDRESSING", "vhost")], None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert_eq!(
            err.to_string(),
            "WALSYNC_S3_ADDRESSING=\"vhost\" is not valid: use \"virtual\" or \"path\""
        );
    }

    #[test]
    fn ca_roots_come_from_the_variables_then_the_system() {
        let roots = |list: &[(&str, &str)], system: Option<&str>| {
            let mut all = KEYS.to_vec();
            all.extend_from_slice(list);
            S3Config::from_vars("b", "", None, vars(&all), system.map(Into::into))
                .unwrap()
                .ca_roots
        };
        assert_eq!(roots(&[], None), CaRoots::BuiltIn);
        assert_eq!(
            roots(&[], Some("/etc/ssl/certs/ca-certificates.crt")),
            CaRoots::System("/etc/ssl/certs/ca-certificates.crt".into())
        );
        let all = [
            ("AWS_CA_BUNDLE", "/ca.pem"),
            ("SSL_CERT_FILE", "/f.pem"),
            ("SSL_CERT_DIR", "/d1:/d2"),
        ];
        assert_eq!(
            roots(&all, Some("/sys.pem")),
            CaRoots::Named(vec![("AWS_CA_BUNDLE", "/ca.pem".into())])
        );
        assert_eq!(
            roots(&all[1..], Some("/sys.pem")),
            CaRoots::Named(vec![
                ("SSL_CERT_FILE", "/f.pem".into()),
                ("SSL_CERT_DIR", "/d1".into()),
                ("SSL_CERT_DIR", "/d2".into())
            ])
        );
        // A file named that holds no certificate is an error naming the variable, at start.
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let bundle = [("AWS_CA_BUNDLE", empty.to_str().unwrap())];
        let err = S3Storage::new(config(&bundle, Some("https://h")).unwrap()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert_eq!(
            err.to_string(),
            format!(
                "AWS_CA_BUNDLE={}: no PEM certificate found there",
                empty.display()
            )
        );
        let missing = dir.path().join("missing.pem");
        let file = [("SSL_CERT_FILE", missing.to_str().unwrap())];
        let err = S3Storage::new(config(&file, Some("https://h")).unwrap())
            .unwrap_err()
            .to_string();
        let expected = format!(
            "SSL_CERT_FILE={}: cannot read the certificate file: ",
            missing.display()
        );
        assert!(err.starts_with(&expected), "{err}");
        // Directories of SSL_CERT_DIR that are not there are skipped, as OpenSSL does; none
        // with a certificate is an error.
        let dirs = [("SSL_CERT_DIR", "/nonexistent-1:/nonexistent-2")];
        let err = S3Storage::new(config(&dirs, Some("https://h")).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SSL_CERT_DIR=/nonexistent-1, SSL_CERT_DIR=/nonexistent-2: no PEM certificate found there"
        );
        // Not read at all for a plain http endpoint.
        assert!(S3Storage::new(config(&file, Some("http://h")).unwrap()).is_ok());
    }

    #[test]
    fn prefixes_with_dot_or_empty_segments_are_refused() {
        for bad in ["a/./b", "a/../b", "..", ".", "a//b", "a\\b"] {
            let c = S3Config::from_vars("b", bad, None, vars(&KEYS), None).unwrap();
            let err = S3Storage::new(c).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}");
            let message = err.to_string();
            assert!(message.contains("the prefix must not contain"), "{message}");
        }
        for good in ["", "a", "a.b/c..d/.e", "a+b/%41"] {
            let c = S3Config::from_vars("b", good, None, vars(&KEYS), None).unwrap();
            assert!(S3Storage::new(c).is_ok(), "{good:?}");
        }
    }
}
