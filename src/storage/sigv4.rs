//! S3 request URLs and their SigV4 signatures, sent in the `Authorization` header as the AWS
//! SDKs send them: for every request, POST included, and never in the query string, which
//! some stores (Cloudflare R2) accept only for a few methods.
//!
//! walsync used rusty-s3 for this; these few functions do the same for the requests walsync
//! sends, using the SHA-256 and HMAC of `ring` (already linked in for TLS). Dropping rusty-s3
//! also dropped the `jiff` date library it signs with and the XML crates it parses responses
//! with (see [`super::xml`]): measured on the static musl build, about 140 KB. The tests
//! check the signatures against AWS's published examples for S3 and against AWS's SigV4 test
//! suite (`testdata/sigv4-test-suite.txt`: canonical request, string to sign and signature
//! of each case); every integration test has them checked again by an independent verifier
//! (the s3s test server).
//!
//! <https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html>

use std::fmt::Write as _;

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

    /// The secret key and the session token: what must never be printed.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret.as_str()).chain(self.token.as_deref())
    }
}

/// The SHA-256 of an empty payload, as SigV4 spells it.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The payload hash of a body that is not hashed (a file streamed from disk): S3 accepts it
/// over TLS and plain HTTP; the body's integrity is checked with `Content-MD5` instead.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

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
        // Each request sets its own query; credentials in the URL would be sent as a second
        // Authorization header.
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

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The URL of `object` (the bucket itself if `None`) with the query parameters `query`.
    ///
    /// The key is appended to the bucket's path, never resolved against it, with every
    /// character but the unreserved ones and `/` percent-encoded: the path sent is the path
    /// signed, byte for byte, and the URL library has nothing left to normalise. The query
    /// is sorted and encoded as SigV4's canonical query string, so it too is sent as signed
    /// (a parameter without a value is sent as `name=`, which S3 reads as the same).
    pub fn url(&self, object: Option<&str>, query: &[(&str, &str)]) -> Url {
        let mut url = self.base_url.clone();
        if let Some(object) = object {
            let path = format!("{}{}", url.path(), utf8_percent_encode(object, PATH));
            url.set_path(&path);
        }
        let query = canonical_query(query);
        url.set_query((!query.is_empty()).then_some(query.as_str()));
        url
    }

    /// The headers that sign a request for `method` to `url` (one of [`Bucket::url`]'s) at
    /// `time`, sent with the extra `headers` (all signed too) and a body whose SHA-256 in hex
    /// is `payload_hash` (or [`UNSIGNED_PAYLOAD`]): `x-amz-date`, `x-amz-content-sha256`,
    /// `x-amz-security-token` with a session token, and `authorization`, as the AWS SDKs
    /// send them. Nothing secret goes in the URL.
    pub fn sign_at(
        &self,
        credentials: &Credentials,
        method: &str,
        url: &Url,
        headers: &[(&str, String)],
        payload_hash: &str,
        time: UtcTime,
    ) -> Vec<(&'static str, String)> {
        // `20130524T000000.000Z` -> `20130524T000000Z`.
        let compact = time.to_compact();
        let timestamp = format!("{}Z", &compact[..15]);

        let mut added: Vec<(&'static str, String)> = vec![
            ("x-amz-date", timestamp.clone()),
            ("x-amz-content-sha256", payload_hash.to_string()),
        ];
        if let Some(token) = &credentials.token {
            added.push(("x-amz-security-token", token.clone()));
        }
        // `port()` is None for the scheme's default port, which the Host header leaves out.
        let host = url.host_str().unwrap_or_default();
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let mut signed = vec![("host", host.as_str())];
        for (name, value) in headers.iter().chain(&added) {
            signed.push((name, value));
        }
        let request = Request {
            method,
            path: url.path(),
            query: url.query().unwrap_or_default(),
            headers: &signed,
            payload_hash,
        };
        let signature = signature(
            &credentials.secret,
            &self.region,
            "s3",
            &timestamp,
            &request,
        );
        added.push((
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{},SignedHeaders={},Signature={}",
                credentials.key, signature.scope, signature.signed_headers, signature.signature
            ),
        ));
        added
    }
}

/// A request as SigV4 sees it: `path` and `query` as sent (already in canonical form, as
/// [`Bucket::url`] builds them), and every header to sign, named in any case.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: &'a [(&'a str, &'a str)],
    payload_hash: &'a str,
}

/// What SigV4 computes for a request, step by step (the parts AWS's test suite publishes).
struct Signature {
    // These two are read only by the tests, against AWS's published values.
    #[cfg_attr(not(test), allow(dead_code))]
    canonical_request: String,
    #[cfg_attr(not(test), allow(dead_code))]
    string_to_sign: String,
    /// `<date>/<region>/<service>/aws4_request`.
    scope: String,
    /// The lowercase names of the signed headers, sorted, `;`-separated.
    signed_headers: String,
    /// Lowercase hex.
    signature: String,
}

/// Sign `request` with `secret` for `region` and `service` at `timestamp`
/// (`YYYYMMDDTHHMMSSZ`).
///
/// Header names are lowercased and sorted; values are trimmed and inner runs of blanks
/// folded to one space; a header given more than once is signed once, its values joined
/// with `,` in the order given, as HTTP combines them.
fn signature(
    secret: &str,
    region: &str,
    service: &str,
    timestamp: &str,
    request: &Request,
) -> Signature {
    let date = &timestamp[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let mut canonical: Vec<(String, String)> = Vec::new();
    for (name, value) in request.headers {
        let name = name.to_ascii_lowercase();
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        match canonical.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => {
                values.push(',');
                values.push_str(&value);
            }
            None => canonical.push((name, value)),
        }
    }
    // Names are unique now, so this sorts by name. (A plain `sort` shares its code with the
    // query's; a `sort_by` of its own cost 5 KB of binary.)
    canonical.sort();
    let signed_headers = canonical
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical_request =
        format!("{}\n{}\n{}\n", request.method, request.path, request.query);
    for (name, value) in &canonical {
        let _ = writeln!(canonical_request, "{name}:{value}");
    }
    let _ = write!(
        canonical_request,
        "\n{signed_headers}\n{}",
        request.payload_hash
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region.as_bytes(), service.as_bytes(), b"aws4_request"] {
        key = hmac_sha256(key.as_ref(), part);
    }
    let signature = hex(hmac_sha256(key.as_ref(), string_to_sign.as_bytes()).as_ref());
    Signature {
        canonical_request,
        string_to_sign,
        scope,
        signed_headers,
        signature,
    }
}

/// SigV4's canonical query string: names and values percent-encoded (everything but the
/// unreserved characters), sorted by name, then value.
fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(name, value)| {
            (
                utf8_percent_encode(name, COMPONENT).to_string(),
                utf8_percent_encode(value, COMPONENT).to_string(),
            )
        })
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        let _ = write!(out, "{name}={value}");
    }
    out
}

/// The SHA-256 of `data` in lowercase hex, for `x-amz-content-sha256`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
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

    // The examples of "Signature Calculations for the Authorization Header" in the S3 API
    // reference (sig-v4-header-based-auth), with their published signatures.
    const KEY: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

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

    /// The headers signing `method` on `url` with `headers` at the examples' time.
    fn signed(
        token: Option<&str>,
        method: &str,
        url: &Url,
        headers: &[(&str, String)],
        payload_hash: &str,
    ) -> Vec<(&'static str, String)> {
        bucket().sign_at(
            &credentials(token),
            method,
            url,
            headers,
            payload_hash,
            time(),
        )
    }

    fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
    }

    fn authorization(signed_headers: &str, signature: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential={KEY}/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders={signed_headers},Signature={signature}"
        )
    }

    #[test]
    fn aws_example_get_object_with_range() {
        let b = bucket();
        let url = b.url(Some("test.txt"), &[]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt"
        );
        let headers = signed(
            None,
            "GET",
            &url,
            &[("Range", "bytes=0-9".into())],
            EMPTY_SHA256,
        );
        assert_eq!(header(&headers, "x-amz-date"), "20130524T000000Z");
        assert_eq!(header(&headers, "x-amz-content-sha256"), EMPTY_SHA256);
        assert_eq!(
            header(&headers, "authorization"),
            authorization(
                "host;range;x-amz-content-sha256;x-amz-date",
                "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
            )
        );
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    }

    #[test]
    fn aws_example_put_object() {
        let b = bucket();
        let url = b.url(Some("test$file.text"), &[]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/test%24file.text"
        );
        let body = b"Welcome to Amazon S3.";
        let hash = sha256_hex(body);
        assert_eq!(
            hash,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let headers = signed(
            None,
            "PUT",
            &url,
            &[
                ("Date", "Fri, 24 May 2013 00:00:00 GMT".into()),
                ("x-amz-storage-class", "REDUCED_REDUNDANCY".into()),
            ],
            &hash,
        );
        assert_eq!(
            header(&headers, "authorization"),
            authorization(
                "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
                "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
            )
        );
    }

    #[test]
    fn aws_examples_with_query_parameters() {
        let b = bucket();
        // A parameter without a value is signed (and sent) as `name=`.
        let url = b.url(None, &[("lifecycle", "")]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/?lifecycle="
        );
        let headers = signed(None, "GET", &url, &[], EMPTY_SHA256);
        assert_eq!(
            header(&headers, "authorization"),
            authorization(
                "host;x-amz-content-sha256;x-amz-date",
                "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
            )
        );
        // Sorted by name whatever the order given.
        let url = b.url(None, &[("prefix", "J"), ("max-keys", "2")]);
        assert_eq!(
            url.as_str(),
            "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J"
        );
        let headers = signed(None, "GET", &url, &[], EMPTY_SHA256);
        assert_eq!(
            header(&headers, "authorization"),
            authorization(
                "host;x-amz-content-sha256;x-amz-date",
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            )
        );
    }

    #[test]
    fn a_session_token_is_a_signed_header_and_an_empty_one_is_none() {
        let b = bucket();
        let url = b.url(Some("test.txt"), &[]);
        let with = signed(Some("tok/en+=="), "GET", &url, &[], EMPTY_SHA256);
        assert_eq!(header(&with, "x-amz-security-token"), "tok/en+==");
        assert!(header(&with, "authorization")
            .contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"));
        let empty = signed(Some(""), "GET", &url, &[], EMPTY_SHA256);
        let without = signed(None, "GET", &url, &[], EMPTY_SHA256);
        assert_eq!(empty, without);
        assert!(without.iter().all(|(n, _)| *n != "x-amz-security-token"));
        // Nothing about the signature is in the URL.
        assert_eq!(url.query(), None);
    }

    #[test]
    fn keys_and_query_values_are_percent_encoded() {
        let endpoint = "http://127.0.0.1:9000/base".parse().unwrap();
        let b = Bucket::new(endpoint, true, "b k".into(), "r".into()).unwrap();
        assert_eq!(b.base_url().as_str(), "http://127.0.0.1:9000/base/b%20k/");
        assert_eq!(
            b.url(Some("/a b/é+&?#%~x"), &[]).as_str(),
            "http://127.0.0.1:9000/base/b%20k//a%20b/%C3%A9%2B%26%3F%23%25~x"
        );
        let url = b.url(
            None,
            &[
                ("prefix", "a b/c+d"),
                ("continuation-token", "x=y/z"),
                ("uploads", ""),
            ],
        );
        assert_eq!(
            url.query(),
            Some("continuation-token=x%3Dy%2Fz&prefix=a%20b%2Fc%2Bd&uploads=")
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

    /// One case of AWS's SigV4 test suite (`testdata/sigv4-test-suite.txt`).
    struct Vector<'a> {
        name: &'a str,
        request: &'a str,
        canonical_request: &'a str,
        string_to_sign: &'a str,
        authorization: &'a str,
    }

    fn vectors(text: &str) -> Vec<Vector<'_>> {
        let mut cases = Vec::new();
        for case in text.split("\n=== ").skip(1) {
            let (name, rest) = case.split_once('\n').unwrap();
            let mut parts = std::collections::HashMap::new();
            for part in rest.split("--- ").skip(1) {
                let (title, body) = part.split_once('\n').unwrap();
                parts.insert(title, body.strip_suffix('\n').unwrap_or(body));
            }
            cases.push(Vector {
                name,
                request: parts["request"],
                canonical_request: parts["canonical request"],
                string_to_sign: parts["string to sign"],
                authorization: parts["authorization"],
            });
        }
        cases
    }

    /// Sign a test suite request as walsync signs its own: the path and query encoded by
    /// the same rules as [`Bucket::url`], the headers the authorization names signed.
    fn sign_vector(vector: &Vector) -> (Signature, String) {
        let (head, body) = vector
            .request
            .split_once("\n\n")
            .unwrap_or((vector.request, ""));
        let mut lines = head.lines();
        let request_line = lines.next().unwrap();
        let (method, rest) = request_line.split_once(' ').unwrap();
        let target = rest.strip_suffix(" HTTP/1.1").unwrap();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let pairs: Vec<(&str, &str)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                // A continuation line: another value of the header above.
                let (name, _) = headers.last().unwrap().clone();
                headers.push((name, line.to_string()));
            } else {
                let (name, value) = line.split_once(':').unwrap();
                headers.push((name.to_string(), value.to_string()));
            }
        }
        // The Authorization header says which headers the suite signed.
        let signed_names: Vec<&str> = vector
            .authorization
            .split_once("SignedHeaders=")
            .unwrap()
            .1
            .split(',')
            .next()
            .unwrap()
            .split(';')
            .collect();
        let signed: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(n, _)| signed_names.contains(&n.to_ascii_lowercase().as_str()))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let path = utf8_percent_encode(path, PATH).to_string();
        let query = canonical_query(&pairs);
        let payload_hash = sha256_hex(body.as_bytes());
        let request = Request {
            method,
            path: &path,
            query: &query,
            headers: &signed,
            payload_hash: &payload_hash,
        };
        let timestamp = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-amz-date"))
            .map(|(_, v)| v.clone())
            .unwrap();
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let signature = signature(secret, "us-east-1", "service", &timestamp, &request);
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{}, SignedHeaders={}, Signature={}",
            signature.scope, signature.signed_headers, signature.signature
        );
        (signature, authorization)
    }

    #[test]
    fn aws_signature_v4_test_suite() {
        let text = include_str!("testdata/sigv4-test-suite.txt");
        let cases = vectors(text);
        assert_eq!(cases.len(), text.matches("\n=== ").count());
        assert!(cases.len() >= 24, "{} cases", cases.len());
        for case in &cases {
            let (signature, authorization) = sign_vector(case);
            assert_eq!(
                signature.canonical_request, case.canonical_request,
                "{}: canonical request",
                case.name
            );
            assert_eq!(
                signature.string_to_sign, case.string_to_sign,
                "{}: string to sign",
                case.name
            );
            assert_eq!(authorization, case.authorization, "{}", case.name);
        }
    }

    /// The base64 crate as an oracle, over every length up to 100 bytes and a few sizes
    /// beyond, of deterministic pseudo-random bytes.
    #[test]
    fn base64_as_the_base64_crate_writes_it() {
        use base64::Engine as _;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for len in (0..=100).chain([255, 256, 257, 1000, 4096]) {
            for _ in 0..20 {
                let bytes: Vec<u8> = (0..len).map(|_| byte()).collect();
                let oracle = base64::engine::general_purpose::STANDARD.encode(&bytes);
                assert_eq!(base64(&bytes), oracle, "{bytes:?}");
            }
        }
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
