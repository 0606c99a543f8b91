//! The little XML that walsync exchanges with S3: request bodies it writes
//! (CompleteMultipartUpload, DeleteObjects) and the few elements it reads from responses
//! (ListObjectsV2, CreateMultipartUpload, CompleteMultipartUpload, DeleteObjects).
//!
//! S3's documents are flat and regular: text-only elements inside a root element, with no
//! comments or CDATA in practice (both are handled anyway). Reading them needs no general
//! parser, only finding elements by name and decoding their text, entities included: object
//! keys may hold any character. A hand-written reader here replaced rusty-s3's instant-xml
//! and xmlparser (measured with the rest of rusty-s3, see [`super::sigv4`]).

/// A document's root element: its name (without any namespace prefix) and its content.
pub fn root(xml: &str) -> Result<(&str, &str), String> {
    let mut rest = xml;
    loop {
        let at = rest
            .find('<')
            .ok_or_else(|| "no XML element in the response".to_string())?;
        rest = &rest[at..];
        if rest.starts_with("<?") {
            rest = skip_past(rest, "?>")?;
        } else if rest.starts_with("<!--") {
            rest = skip_past(rest, "-->")?;
        } else if rest.starts_with("<!") {
            rest = skip_past(rest, ">")?;
        } else {
            break;
        }
    }
    let (name, _, _) = open_tag(rest).ok_or_else(|| "malformed XML start tag".to_string())?;
    let name = local(name);
    let mut elements = Elements {
        rest,
        name,
        depth_checked: false,
    };
    match elements.next() {
        Some(Ok(content)) => Ok((name, content)),
        Some(Err(e)) => Err(e),
        None => Err(format!("unterminated <{name}> element")),
    }
}

/// The document must have root element `name`; its content.
pub fn expect_root<'a>(xml: &'a str, name: &str) -> Result<&'a str, String> {
    match root(xml)? {
        (found, content) if found == name => Ok(content),
        (found, _) => Err(format!("expected a <{name}> document, got <{found}>")),
    }
}

fn skip_past<'a>(text: &'a str, end: &str) -> Result<&'a str, String> {
    text.find(end)
        .map(|at| &text[at + end.len()..])
        .ok_or_else(|| "malformed XML".to_string())
}

/// `name` without its namespace prefix (`s3:Key` -> `Key`).
fn local(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

/// The start tag at the beginning of `text` (`<Name attr="...">` or `<Name/>`): its name, its
/// length, and whether it is self-closing.
fn open_tag(text: &str) -> Option<(&str, usize, bool)> {
    let body = text.strip_prefix('<')?;
    let name_len = body
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(body.len());
    let name = &body[..name_len];
    if name.is_empty() {
        return None;
    }
    // Attribute values may hold `>`: skip quoted text.
    let mut quote = None;
    for (i, c) in body[name_len..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => {
                let end = name_len + i;
                let self_closing = body[..end].ends_with('/');
                return Some((name, 1 + end + 1, self_closing));
            }
            (None, _) => {}
        }
    }
    None
}

/// The contents of successive `name` elements in `text`, at any depth (walsync looks for
/// names that do not nest in S3's documents). A self-closing element has empty content.
pub fn elements<'a>(text: &'a str, name: &'a str) -> Elements<'a> {
    Elements {
        rest: text,
        name,
        depth_checked: true,
    }
}

pub struct Elements<'a> {
    rest: &'a str,
    name: &'a str,
    /// Whether a start tag with another name is skipped (searching) or is an error (the
    /// caller placed `rest` at the element, as [`root`] does).
    depth_checked: bool,
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<&'a str, String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let at = self.rest.find('<')?;
            let tag = &self.rest[at..];
            if tag.starts_with("<!--") {
                match skip_past(tag, "-->") {
                    Ok(rest) => self.rest = rest,
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            if tag.starts_with("<![CDATA[") {
                match skip_past(tag, "]]>") {
                    Ok(rest) => self.rest = rest,
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let Some((found, len, self_closing)) = open_tag(tag).filter(|_| {
                !tag.starts_with("</") && !tag.starts_with("<?") && !tag.starts_with("<!")
            }) else {
                self.rest = &tag[1..];
                continue;
            };
            if local(found) != self.name {
                if !self.depth_checked {
                    return Some(Err(format!("expected <{}>", self.name)));
                }
                self.rest = &tag[len..];
                continue;
            }
            let content = &tag[len..];
            if self_closing {
                self.rest = content;
                return Some(Ok(""));
            }
            // The matching end tag: same name, nothing of the same name nested in between.
            let close = format!("</{found}");
            let Some(end) = find_close(content, &close) else {
                self.rest = "";
                return Some(Err(format!("unterminated <{found}> element")));
            };
            self.rest = &content[end..];
            return Some(Ok(&content[..end]));
        }
    }
}

/// Where `close` (`</Name`, followed by optional blanks and `>`) starts in `content`, skipping
/// CDATA sections and comments, which may hold anything.
fn find_close(content: &str, close: &str) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + content[from..].find('<')?;
        let tag = &content[at..];
        if tag.starts_with("<![CDATA[") {
            from = at + tag.find("]]>")? + 3;
        } else if tag.starts_with("<!--") {
            from = at + tag.find("-->")? + 3;
        } else if let Some(after) = tag.strip_prefix(close) {
            if after.trim_start().starts_with('>') {
                return Some(at);
            }
            from = at + 1;
        } else {
            from = at + 1;
        }
    }
}

/// The decoded text of the first `name` element in `text`, if there is one.
pub fn text(text: &str, name: &str) -> Result<Option<String>, String> {
    match elements(text, name).next() {
        None => Ok(None),
        Some(content) => unescape(content?).map(Some),
    }
}

/// Like [`text`], for an element the document must have.
pub fn required(text_: &str, name: &str) -> Result<String, String> {
    text(text_, name)?.ok_or_else(|| format!("missing <{name}>"))
}

/// Element text as it reads: entities (`&amp;`, `&#xD;`...) decoded, CDATA sections taken
/// literally, comments dropped. Nested elements are an error (walsync reads text-only ones).
pub fn unescape(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find(['&', '<']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
            let end = cdata
                .find("]]>")
                .ok_or_else(|| "unterminated CDATA section".to_string())?;
            out.push_str(&cdata[..end]);
            rest = &cdata[end + 3..];
        } else if rest.starts_with("<!--") {
            rest = skip_past(rest, "-->")?;
        } else if rest.starts_with('<') {
            return Err("unexpected element in text".to_string());
        } else {
            let end = rest
                .find(';')
                .ok_or_else(|| format!("unterminated entity in {raw:?}"))?;
            let entity = &rest[1..end];
            let c = match entity {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                _ => {
                    let code = if let Some(hex) = entity
                        .strip_prefix("#x")
                        .or_else(|| entity.strip_prefix("#X"))
                    {
                        u32::from_str_radix(hex, 16).ok()
                    } else if let Some(dec) = entity.strip_prefix('#') {
                        dec.parse().ok()
                    } else {
                        None
                    };
                    code.and_then(char::from_u32)
                        .ok_or_else(|| format!("unknown entity &{entity};"))?
                }
            };
            out.push(c);
            rest = &rest[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `text` escaped for element content, as instant-xml (rusty-s3) wrote it: `& < > " '` as
/// entities, and carriage returns as `&#xD;` (a reader would turn a raw one into `\n`).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_are_decoded() {
        assert_eq!(
            unescape("a&amp;b&lt;c&gt;d&quot;e&apos;f").unwrap(),
            "a&b<c>d\"e'f"
        );
        assert_eq!(
            unescape("&#65;&#x42;&#X43;&#xe9;&#x1F600;").unwrap(),
            "ABCé😀"
        );
        assert_eq!(unescape("&amp;lt;").unwrap(), "&lt;");
        assert_eq!(unescape("x<![CDATA[<&amp;>]]>y").unwrap(), "x<&amp;>y");
        assert_eq!(unescape("a<!-- c -->b").unwrap(), "ab");
        assert_eq!(unescape("  spaces kept ").unwrap(), "  spaces kept ");
        for bad in [
            "&bogus;",
            "&amp",
            "&#xD800;",
            "&#x110000;",
            "&#;",
            "a<b>c</b>",
        ] {
            assert!(unescape(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn escape_round_trips_any_text() {
        let text = "a&b<c>d\"e'f\rg\nh\té😀 /+%";
        let escaped = escape(text);
        assert_eq!(escaped, "a&amp;b&lt;c&gt;d&quot;e&apos;f&#xD;g\nh\té😀 /+%");
        assert_eq!(unescape(&escaped).unwrap(), text);
    }

    #[test]
    fn root_and_elements() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- hi -->\
                   <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                   <Name>b</Name><Contents><Key>a&amp;b</Key><Size>3</Size></Contents>\
                   <Contents><Key>x</Key><Size>4</Size><Owner><ID/></Owner></Contents>\
                   <NextContinuationToken/></ListBucketResult>";
        let (name, content) = root(xml).unwrap();
        assert_eq!(name, "ListBucketResult");
        assert!(content.starts_with("<Name>b</Name>"));
        assert!(content.ends_with("<NextContinuationToken/>"));
        let contents: Vec<_> = elements(content, "Contents").map(Result::unwrap).collect();
        assert_eq!(contents.len(), 2);
        assert_eq!(required(contents[0], "Key").unwrap(), "a&b");
        assert_eq!(text(contents[1], "Size").unwrap().as_deref(), Some("4"));
        assert_eq!(text(contents[1], "ID").unwrap().as_deref(), Some(""));
        assert_eq!(
            text(content, "NextContinuationToken").unwrap().as_deref(),
            Some("")
        );
        assert_eq!(text(content, "Missing").unwrap(), None);
        assert!(required(content, "Missing").is_err());
        assert_eq!(expect_root(xml, "ListBucketResult").unwrap(), content);
        assert!(expect_root(xml, "DeleteResult").is_err());
    }

    #[test]
    fn names_are_matched_whole_with_prefixes_attributes_and_blanks() {
        let xml = "<r:Root a='x>y' b=\"1\"><KeyMarker>no</KeyMarker><s3:Key >yes</s3:Key >\
                   <Key>second</Key ></r:Root>";
        let (name, content) = root(xml).unwrap();
        assert_eq!(name, "Root");
        let keys: Vec<_> = elements(content, "Key").map(Result::unwrap).collect();
        assert_eq!(keys, ["yes", "second"]);
        assert_eq!(
            text("<Key><![CDATA[</Key>]]></Key>", "Key")
                .unwrap()
                .as_deref(),
            Some("</Key>")
        );
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in [
            "",
            "not xml",
            "<Root>",
            "<Root><Key>x</Root>",
            "<?xml version=\"1.0\"",
        ] {
            let result = root(bad).and_then(|(_, c)| required(c, "Key"));
            assert!(result.is_err(), "{bad:?}: {result:?}");
        }
        assert!(text("<Key>a&b</Key>", "Key").is_err());
    }
}
