//! The XML documents of S3's API, as walsync reads and writes them: the pages of a
//! ListObjectsV2 and of a ListMultipartUploads listing, DeleteObjects' answer, a field of an
//! error document, and the two bodies walsync sends (DeleteObjects, CompleteMultipartUpload).
//!
//! They are apart from the requests ([`super::request`]) so that every one of them can be
//! held to documents as AWS and the other stores write them, without a server: everything
//! here is a function of text, on [`crate::storage::xml`]'s small reader. One thing the
//! reader cannot settle alone is how keys are spelled: asked for `encoding-type=url`, AWS
//! encodes keys in listings, while some stores say they did and list them as they are;
//! [`parse_list_page`] tells the two apart by how the store echoes the prefix.

use crate::storage::xml;

/// One page of a ListObjectsV2 listing.
pub(super) struct ListPage {
    pub(super) objects: Vec<ListedObject>,
    pub(super) next_continuation_token: Option<String>,
    /// The store echoed the prefix unencoded although asked to encode keys: its keys are
    /// unencoded too.
    pub(super) raw: bool,
}

pub(super) struct ListedObject {
    /// The key as listed (XML entities decoded).
    pub(super) key: String,
    /// The key URL-decoded, when the listing says it encoded keys.
    pub(super) decoded: Option<String>,
    pub(super) size: u64,
}

/// `text` URL-decoded as S3 encodes listings (`encoding-type=url`): AWS and MinIO encode
/// keys as HTML forms do (space as `+`, `+` as `%2B`), others percent-encode everything:
/// decoding `+` first reads both.
fn url_decode(text: &str) -> Option<String> {
    let plus_decoded = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_decoded)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
}

/// A ListObjectsV2 page, of a listing of `prefix` (the full object prefix asked for).
pub(super) fn parse_list_page(text: &str, prefix: &str) -> std::result::Result<ListPage, String> {
    let content = xml::expect_root(text, "ListBucketResult")?;
    let url_encoded = xml::text(content, "EncodingType")?.as_deref() == Some("url");
    // An honest store echoes the prefix encoded, one that lists raw keys echoes it raw:
    // they can be told apart when the prefix has a character that encoding changes.
    let raw = url_encoded
        && match xml::text(content, "Prefix")? {
            Some(echoed) => echoed == prefix && url_decode(&echoed).as_deref() != Some(prefix),
            None => false,
        };
    let mut objects = Vec::new();
    for entry in xml::elements(content, "Contents") {
        let entry = entry?;
        let key = xml::required(entry, "Key")?;
        let decoded = if url_encoded { url_decode(&key) } else { None };
        let size = match xml::text(entry, "Size")? {
            Some(size) => size
                .trim()
                .parse()
                .map_err(|_| format!("invalid <Size> {size:?} of {key:?}"))?,
            None => 0,
        };
        objects.push(ListedObject { key, decoded, size });
    }
    let truncated = match xml::text(content, "IsTruncated")? {
        Some(t) => match t.trim() {
            "true" => Some(true),
            "false" => Some(false),
            other => return Err(format!("invalid <IsTruncated> {other:?}")),
        },
        None => None,
    };
    // Without a token a truncated listing would silently end early, while following a token
    // given with a complete one would restart it.
    let token = xml::text(content, "NextContinuationToken")?;
    let next_continuation_token = match (truncated, token) {
        (Some(false), _) => None,
        (_, Some(token)) if !token.is_empty() => Some(token),
        (Some(true), _) => {
            return Err("truncated listing without <NextContinuationToken>".to_string())
        }
        (None, _) => None,
    };
    Ok(ListPage {
        objects,
        next_continuation_token,
        raw,
    })
}

/// One incomplete multipart upload of a ListMultipartUploads page.
pub(super) struct ListedUpload {
    /// The object key (decoded as the keys of a listing are, see [`parse_list_page`]).
    pub(super) key: String,
    pub(super) upload_id: String,
    /// When it was started (RFC 3339).
    pub(super) initiated: String,
}

pub(super) struct UploadsPage {
    pub(super) uploads: Vec<ListedUpload>,
    /// The key and upload id markers of the next page, if there is one.
    pub(super) next: Option<(String, String)>,
}

/// A ListMultipartUploads page, of a listing of `prefix` (the full object prefix asked for).
pub(super) fn parse_uploads_page(
    text: &str,
    prefix: &str,
) -> std::result::Result<UploadsPage, String> {
    let content = xml::expect_root(text, "ListMultipartUploadsResult")?;
    let url_encoded = xml::text(content, "EncodingType")?.as_deref() == Some("url");
    let mut uploads = Vec::new();
    for entry in xml::elements(content, "Upload") {
        let entry = entry?;
        let raw_key = xml::required(entry, "Key")?;
        // As in listings: the decoded key if it is under the prefix, else the key as listed.
        let key = match url_decode(&raw_key).filter(|_| url_encoded) {
            Some(decoded) if decoded.starts_with(prefix) => decoded,
            _ => raw_key,
        };
        uploads.push(ListedUpload {
            key,
            upload_id: xml::required(entry, "UploadId")?,
            initiated: xml::text(entry, "Initiated")?.unwrap_or_default(),
        });
    }
    let truncated = xml::text(content, "IsTruncated")?.as_deref() == Some("true");
    let next = if truncated {
        let key = xml::text(content, "NextKeyMarker")?.unwrap_or_default();
        let id = xml::text(content, "NextUploadIdMarker")?.unwrap_or_default();
        if key.is_empty() && id.is_empty() {
            return Err("truncated listing without <NextKeyMarker>".to_string());
        }
        let key = match url_decode(&key).filter(|_| url_encoded) {
            Some(decoded) if decoded.starts_with(prefix) => decoded,
            _ => key,
        };
        Some((key, id))
    } else {
        None
    };
    Ok(UploadsPage { uploads, next })
}

/// A key that DeleteObjects reports as not deleted.
pub(super) struct DeleteFailure {
    pub(super) key: String,
    pub(super) code: String,
    pub(super) message: String,
}

pub(super) fn parse_delete_result(text: &str) -> std::result::Result<Vec<DeleteFailure>, String> {
    let content = xml::expect_root(text, "DeleteResult")?;
    xml::elements(content, "Error")
        .map(|error| {
            let error = error?;
            Ok(DeleteFailure {
                key: xml::required(error, "Key")?,
                code: xml::required(error, "Code")?,
                message: xml::text(error, "Message")?.unwrap_or_default(),
            })
        })
        .collect()
}

/// The DeleteObjects request body for `objects`, in quiet mode (only failures are reported).
pub(super) fn delete_objects_body(objects: &[String]) -> String {
    let mut body = String::from("<Delete>");
    for object in objects {
        body.push_str("<Object><Key>");
        body.push_str(&xml::escape(object));
        body.push_str("</Key></Object>");
    }
    body.push_str("<Quiet>true</Quiet></Delete>");
    body
}

/// The CompleteMultipartUpload request body: the `n`-th ETag is part number `n`.
pub(super) fn complete_multipart_body(etags: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (i, etag) in etags.iter().enumerate() {
        body.push_str(&format!(
            "<Part><ETag>{}</ETag><PartNumber>{}</PartNumber></Part>",
            xml::escape(etag),
            i + 1
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

/// The decoded text of the first `<tag>` of an error document (empty if none): entities
/// decoded; the raw text if it does not decode.
pub(super) fn xml_text(body: &str, tag: &str) -> String {
    match xml::elements(body, tag).next() {
        Some(Ok(raw)) => xml::unescape(raw).unwrap_or_else(|_| raw.to_string()),
        _ => String::new(),
    }
    .trim()
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::s3::errors::shorten;
    use crate::storage::sigv4;
    use md5::Digest as _;

    #[test]
    fn xml_texts_are_decoded_and_shortened() {
        let body = "<Error><Code>NoSuchKey</Code><Message> The key\n does &apos;not&apos; \
                    exist. </Message></Error>";
        assert_eq!(xml_text(body, "Code"), "NoSuchKey");
        assert_eq!(
            shorten(&xml_text(body, "Message")),
            "The key does 'not' exist."
        );
        assert_eq!(xml_text(body, "Missing"), "");
        assert_eq!(xml_text("<Code>unterminated", "Code"), "");
        assert_eq!(xml_text("<Code>a &bogus; b</Code>", "Code"), "a &bogus; b");
    }

    #[test]
    fn list_pages_decode_keys_and_follow_tokens() {
        let page = |body: &str| {
            parse_list_page(
                &format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
                 <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{body}</ListBucketResult>"
                ),
                "p",
            )
        };
        let p = page(
            "<Name>b</Name><Prefix>p</Prefix><EncodingType>url</EncodingType>\
             <IsTruncated>true</IsTruncated>\
             <Contents><Key>a+b%2Bc%20%C3%A9</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
             <ETag>&quot;x&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>\
             <Contents><Key>k&amp;%3C</Key><Size>0</Size></Contents>\
             <NextContinuationToken>t/1+=</NextContinuationToken>",
        )
        .unwrap();
        let keys: Vec<_> = p
            .objects
            .iter()
            .map(|o| (o.decoded.as_deref().unwrap(), o.key.as_str(), o.size))
            .collect();
        assert_eq!(
            keys,
            [("a b+c é", "a+b%2Bc%20%C3%A9", 12), ("k&<", "k&%3C", 0)]
        );
        assert!(!p.raw);
        assert_eq!(p.next_continuation_token.as_deref(), Some("t/1+="));
        // Without EncodingType, keys are taken as they are (entities decoded).
        let p = page("<Contents><Key>a+b%20&lt;</Key><Size>1</Size></Contents>").unwrap();
        assert_eq!(p.objects[0].key, "a+b%20<");
        assert_eq!(p.objects[0].decoded, None);
        assert_eq!(p.next_continuation_token, None);
        // A complete listing ends even with a token; a truncated one needs one.
        let p = page(
            "<IsTruncated>false</IsTruncated><NextContinuationToken>t</NextContinuationToken>",
        )
        .unwrap();
        assert_eq!(p.next_continuation_token, None);
        assert!(page("<IsTruncated>true</IsTruncated>").is_err());
        assert!(page("<IsTruncated>true</IsTruncated><NextContinuationToken/>").is_err());
        assert!(page("<Contents><Key>k</Key><Size>-1</Size></Contents>").is_err());
        assert!(page("<Contents><Size>1</Size></Contents>").is_err());
        assert!(parse_list_page("<Error><Code>NoSuchBucket</Code></Error>", "p").is_err());
    }

    #[test]
    fn a_listing_that_echoes_its_prefix_unencoded_lists_raw_keys() {
        let page = |prefix: &str, echoed: &str| {
            parse_list_page(
                &format!(
                    "<ListBucketResult><Prefix>{echoed}</Prefix><EncodingType>url</EncodingType>\
                     <Contents><Key>{echoed}/k</Key><Size>1</Size></Contents></ListBucketResult>"
                ),
                prefix,
            )
            .unwrap()
            .raw
        };
        // s3s-fs: `encoding-type=url` echoed, nothing encoded.
        assert!(page("a+b", "a+b"));
        assert!(page("x%41y/z", "x%41y/z"));
        // AWS: the prefix encoded as the keys are.
        assert!(!page("a+b", "a%2Bb"));
        assert!(!page("a b", "a+b"));
        // Nothing to tell them apart by.
        assert!(!page("plain/prefix", "plain/prefix"));
    }

    #[test]
    fn multipart_upload_listings() {
        let page = parse_uploads_page(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>\
             <NextKeyMarker>p%2Bq/app/b</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>\
             <EncodingType>url</EncodingType><MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated>\
             <Upload><Key>p%2Bq/app/a</Key><UploadId>id1</UploadId><Initiator><ID>x</ID></Initiator>\
             <StorageClass>STANDARD</StorageClass><Initiated>2026-12-01T10:00:00.000Z</Initiated></Upload>\
             <Upload><Key>p+q/app/b</Key><UploadId>id2</UploadId>\
             <Initiated>2026-12-06T10:00:00.000Z</Initiated></Upload>\
             </ListMultipartUploadsResult>",
            "p+q/",
        )
        .unwrap();
        let got: Vec<_> = page
            .uploads
            .iter()
            .map(|u| (u.key.as_str(), u.upload_id.as_str(), u.initiated.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("p+q/app/a", "id1", "2026-12-01T10:00:00.000Z"),
                // Listed raw (decoding would read "p q/"): taken as listed.
                ("p+q/app/b", "id2", "2026-12-06T10:00:00.000Z"),
            ]
        );
        assert_eq!(
            page.next,
            Some(("p+q/app/b".to_string(), "id2".to_string()))
        );
        let last = parse_uploads_page(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
            "",
        )
        .unwrap();
        assert!(last.uploads.is_empty() && last.next.is_none());
        assert!(parse_uploads_page(
            "<ListMultipartUploadsResult><IsTruncated>true</IsTruncated></ListMultipartUploadsResult>",
            ""
        )
        .is_err());
    }

    #[test]
    fn delete_objects_bodies_and_answers() {
        let body = delete_objects_body(&["a".to_string(), "b&<\r\"'é".to_string()]);
        assert_eq!(
            body,
            "<Delete><Object><Key>a</Key></Object>\
             <Object><Key>b&amp;&lt;&#xD;&quot;&apos;é</Key></Object><Quiet>true</Quiet></Delete>"
        );
        // The Content-MD5 header of a body, as S3 checks it (`openssl md5 -binary | base64`).
        assert_eq!(
            sigv4::base64(&md5::Md5::digest(b"<Delete></Delete>")),
            "R2cEG0GhQVRNiyXR3QnSyw=="
        );
        let failures = parse_delete_result(
            "<?xml version=\"1.0\"?><DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Deleted><Key>gone</Key></Deleted>\
             <Error><Key>x&amp;y</Key><Code>AccessDenied</Code><Message>No &lt;way&gt;.</Message></Error>\
             <Error><Key>z</Key><Code>InternalError</Code></Error></DeleteResult>",
        )
        .unwrap();
        let got: Vec<_> = failures
            .iter()
            .map(|f| (f.key.as_str(), f.code.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("x&y", "AccessDenied", "No <way>."),
                ("z", "InternalError", "")
            ]
        );
        assert!(parse_delete_result("<DeleteResult/>").unwrap().is_empty());
        assert!(parse_delete_result("<Error><Code>SlowDown</Code></Error>").is_err());
        assert_eq!(
            complete_multipart_body(&["\"e1\"".to_string(), "e2".to_string()]),
            "<CompleteMultipartUpload><Part><ETag>&quot;e1&quot;</ETag><PartNumber>1</PartNumber></Part>\
             <Part><ETag>e2</ETag><PartNumber>2</PartNumber></Part></CompleteMultipartUpload>"
        );
    }
}
