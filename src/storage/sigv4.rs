//! S3 request URLs and their SigV4 query-string signatures ("presigned URLs").
//!
//! walsync used rusty-s3 for this; these few functions do the same for the requests walsync
//! sends, with the same URLs and signatures, using the SHA-256 and HMAC of `ring` (already
//! linked in for TLS). Dropping rusty-s3 also dropped the `jiff` date library it signs with
//! and the XML crates it parses responses with (see [`super::xml`]): measured on the static
//! musl build, about 140 KB.
//!
//! <https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html>

use std::fmt::Write as _;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use ring::{digest, hmac};
use url::Url;

use crate::utc::UtcTime;

/// Everything but the unreserved characters of RFC 3986 (`A-Z a-z 0-9 - . _ ~`) and `/`: what
/// SigV4 wants encoded in a path. Non-ASCII bytes are always encoded.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'!')
    .add(b'"')
    .add(b'#')
    .add(b'$')
    .add(b'%')
    .add(b'&')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*')
    .add(b'+')
    .add(b',')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// [`PATH`] and `/` too: for query names and values, and a bucket name as one path segment.
const COMPONENT: &AsciiSet = &PATH.add(b'/');

/// Why an endpoint cannot address a bucket. Its `Debug` spelling is part of the error message
/// (`invalid S3 endpoint "...": MissingHost (...)`), as it was with rusty-s3.
#[derive(Debug)]
pub enum EndpointError {
    UnsupportedScheme,
    MissingHost,
    // Read through `Debug` only.
    ParseError(#[allow(dead_code)] url::ParseError),
}

/// Access key, secret key and optional session token.
pub struct Credentials {
    key: String,
    secret: String,
    token: Option<String>,
}

impl Credentials {
    pub fn new(key: String, secret: String, token: Option<String>) -> Credentials {
        Credentials {
            key,
            secret,
            token: token.filter(|t| !t.is_empty()),
        }
    }
}

/// A bucket at an endpoint: builds the URLs of its objects and signs requests to them.
#[derive(Debug, Clone)]
pub struct Bucket {
    base_url: Url,
    name: String,
    region: String,
}

impl Bucket {
    /// The bucket `name` at `endpoint`: path style (`https://host/name/key`) or virtual-hosted
    /// style (`https://name.host/key`).
    pub fn new(
        mut endpoint: Url,
        path_style: bool,
        name: String,
        region: String,
    ) -> Result<Bucket, EndpointError> {
        endpoint.host_str().ok_or(EndpointError::MissingHost)?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(EndpointError::UnsupportedScheme);
        }
        // Signing replaces the query string; credentials in the URL would be sent in an
        // Authorization header, which S3 refuses next to a presigned query.
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        let _ = endpoint.set_username("");
        let _ = endpoint.set_password(None);
        // The endpoint's path prefixes every URL: it must end with `/` to be one.
        if !endpoint.path().ends_with('/') {
            let path = format!("{}/", endpoint.path());
            endpoint.set_path(&path);
        }
        if path_style {
            // One encoded segment, so that the name cannot change anything else of the URL.
            let path = format!(
                "{}{}/",
                endpoint.path(),
                utf8_percent_encode(&name, COMPONENT)
            );
            endpoint.set_path(&path);
        } else {
            let host = format!("{}.{}", name, endpoint.host_str().unwrap_or_default());
            endpoint
                .set_host(Some(&host))
                .map_err(EndpointError::ParseError)?;
            // `set_host` drops what follows a `:`, lowercases and maps characters: that could
            // be another bucket's host.
            if endpoint.host_str() != Some(host.as_str()) {
                return Err(EndpointError::ParseError(
                    url::ParseError::InvalidDomainCharacter,
                ));
            }
        }
        Ok(Bucket {
            base_url: endpoint,
            name,
            region,
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The (unsigned) URL of `object`. The key is appended to the bucket's path, never
    /// resolved against it: a key starting with `/` cannot replace the bucket's path.
    pub fn object_url(&self, object: &str) -> Url {
        let mut url = self.base_url.clone();
        let path = format!("{}{}", url.path(), utf8_percent_encode(object, PATH));
        url.set_path(&path);
        url
    }

    /// `url` (one of this bucket's) presigned for `method` with the extra query parameters
    /// `query`, valid for `expires` from now.
    pub fn sign(
        &self,
        credentials: &Credentials,
        method: &str,
        url: Url,
        query: &[(&str, &str)],
        expires: Duration,
    ) -> Url {
        self.sign_at(credentials, method, url, query, expires, UtcTime::now())
    }

    fn sign_at(
        &self,
        credentials: &Credentials,
        method: &str,
        mut url: Url,
        query: &[(&str, &str)],
        expires: Duration,
        time: UtcTime,
    ) -> Url {
        // `20130524T000000.000Z` -> `20130524T000000Z` and `20130524`.
        let compact = time.to_compact();
        let timestamp = format!("{}Z", &compact[..15]);
        let date = &compact[..8];
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let credential = format!("{}/{scope}", credentials.key);
        let expires = expires.as_secs().to_string();

        let mut params: Vec<(&str, &str)> = vec![
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", &credential),
            ("X-Amz-Date", &timestamp),
            ("X-Amz-Expires", &expires),
            ("X-Amz-SignedHeaders", "host"),
        ];
        if let Some(token) = &credentials.token {
            params.push(("X-Amz-Security-Token", token));
        }
        params.extend_from_slice(query);
        params.sort_by(|a, b| a.0.cmp(b.0));
        let mut canonical_query = String::new();
        for (name, value) in &params {
            if !canonical_query.is_empty() {
                canonical_query.push('&');
            }
            let _ = write!(
                canonical_query,
                "{}={}",
                utf8_percent_encode(name, COMPONENT),
                utf8_percent_encode(value, COMPONENT)
            );
        }

        // `port()` is None for the scheme's default port, which the Host header leaves out.
        let host = url.host_str().unwrap_or_default();
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let canonical_request = format!(
            "{method}\n{}\n{canonical_query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
            url.path()
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
            hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
        );
        let mut key = hmac_sha256(
            format!("AWS4{}", credentials.secret).as_bytes(),
            date.as_bytes(),
        );
        for part in [self.region.as_bytes(), b"s3", b"aws4_request"] {
            key = hmac_sha256(key.as_ref(), part);
        }
        let signature = hmac_sha256(key.as_ref(), string_to_sign.as_bytes());
        canonical_query.push_str("&X-Amz-Signature=");
        canonical_query.push_str(&hex(signature.as_ref()));
        url.set_query(Some(&canonical_query));
        url
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Standard base64 with padding, for the `Content-MD5` header.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // The examples of the AWS documentation, as rusty-s3's tests check them.
    const KEY: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const DAY: Duration = Duration::from_secs(86400);

    fn time() -> UtcTime {
        UtcTime::from_millis(1_369_353_600_000)
    }

    fn bucket() -> Bucket {
        let endpoint = "https://s3.amazonaws.com".parse().unwrap();
        Bucket::new(endpoint, false, "examplebucket".into(), "us-east-1".into()).unwrap()
    }

    fn credentials(token: Option<&str>) -> Credentials {
        Credentials::new(KEY.into(), SECRET.into(), token.map(str::to_string))
    }

    /// The example bucket's `url` signed for `method` with `query`, at the example's time.
    fn signed(token: Option<&str>, method: &str, url: Url, query: &[(&str, &str)]) -> Url {
        bucket().sign_at(&credentials(token), method, url, query, DAY, time())
    }

    #[test]
    fn aws_example() {
        let b = bucket();
        let url = signed(None, "GET", b.object_url("test.txt"), &[]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn aws_example_with_token_and_empty_token() {
        let b = bucket();
        let url = signed(
            Some("oej5cie4uctureturdtuc5dctd"),
            "GET",
            b.object_url("test.txt"),
            &[],
        );
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-Security-Token=oej5cie4uctureturdtuc5dctd&X-Amz-SignedHeaders=host&X-Amz-Signature=bf77b83a7135594046c90a7e7e10cf1a4c8f8ecc1d541d0f42bea6b7670870c7"
        );
        let with_empty = signed(Some(""), "GET", b.object_url("test.txt"), &[]);
        let without = signed(None, "GET", b.object_url("test.txt"), &[]);
        assert_eq!(with_empty, without);
    }

    #[test]
    fn query_parameters_are_sorted_and_signed() {
        // rusty-s3's signatures for these requests (its tests, same time and keys).
        let b = bucket();
        let url = signed(None, "POST", b.base_url().clone(), &[("delete", "1")]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&delete=1&X-Amz-Signature=0e6170ba8cb7873da76b7fb63638658607f484265935099b3d8cea5195af843c"
        );
        let url = signed(
            None,
            "DELETE",
            b.object_url("test.txt"),
            &[("uploadId", "abcd")],
        );
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&uploadId=abcd&X-Amz-Signature=7670bc768a7cdb5c276a9dddadeefdffb52061f94db6c14b4a9284fdc195bb59"
        );
    }

    #[test]
    fn keys_and_query_values_are_percent_encoded() {
        let endpoint = "http://127.0.0.1:9000/base".parse().unwrap();
        let b = Bucket::new(endpoint, true, "b k".into(), "r".into()).unwrap();
        assert_eq!(b.base_url().as_str(), "http://127.0.0.1:9000/base/b%20k/");
        assert_eq!(
            b.object_url("/a b/é+&?#%~x").as_str(),
            "http://127.0.0.1:9000/base/b%20k//a%20b/%C3%A9%2B%26%3F%23%25~x"
        );
        let url = signed(
            None,
            "GET",
            b.base_url().clone(),
            &[("prefix", "a b/c+d"), ("continuation-token", "x=y/z")],
        );
        let query = url.query().unwrap();
        assert!(
            query.starts_with("X-Amz-Algorithm=") && query.contains("&X-Amz-SignedHeaders=host&continuation-token=x%3Dy%2Fz&prefix=a%20b%2Fc%2Bd&X-Amz-Signature="),
            "{query}"
        );
    }

    #[test]
    fn endpoints_that_cannot_address_a_bucket() {
        let new = |endpoint: &str, path_style: bool, name: &str| {
            Bucket::new(
                endpoint.parse().unwrap(),
                path_style,
                name.into(),
                "r".into(),
            )
            .map(|b| b.base_url().to_string())
            .map_err(|e| format!("{e:?}"))
        };
        assert_eq!(new("ftp://h", true, "b").unwrap_err(), "UnsupportedScheme");
        assert_eq!(new("unix:/run/s3", true, "b").unwrap_err(), "MissingHost");
        assert_eq!(
            new("https://h:1", false, "a:2").unwrap_err(),
            "ParseError(InvalidDomainCharacter)"
        );
        assert_eq!(
            new("https://user:pw@h/p?q#f", true, "b").unwrap(),
            "https://h/p/b/"
        );
        assert_eq!(new("https://h", false, "b").unwrap(), "https://b.h/");
    }

    #[test]
    fn base64_of_md5_digests() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff; 16]), "/////////////////////w==");
    }
}
