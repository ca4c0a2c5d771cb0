//! The node name a peer's certificate vouches for: the first DNS subject alternative name, else
//! the subject common name.
//!
//! Only names, never trust: these functions read a certificate, they do not verify it. They are
//! meaningful on a connection whose handshake the configured verifier accepted, which is the only
//! time rustls exposes peer certificates.

use rustls::ServerConnection;
use rustls::pki_types::CertificateDer;

/// The node name of the verified client certificate on an accepted mutual-TLS connection, or
/// `None` if the client presented no certificate (no `client_ca` configured) or it names none.
pub fn peer_identity(connection: &ServerConnection) -> Option<String> {
    let end_entity = connection.peer_certificates()?.first()?;
    certificate_identity(end_entity.as_ref())
}

/// The node name a DER certificate names: its first DNS subject alternative name (wildcards
/// skipped: a wildcard names no single node), else its subject common name. `None` if the bytes
/// are not a certificate or it names neither.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let der = CertificateDer::from(der);
    let certificate = webpki::EndEntityCert::try_from(&der).ok()?;
    if let Some(dns_name) = certificate
        .valid_dns_names()
        .find(|name| !name.starts_with('*'))
    {
        return Some(dns_name.to_owned());
    }
    common_name(certificate.subject())
}

/// DER tags used when walking a distinguished name.
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;

/// id-at-commonName, 2.5.4.3, as DER object identifier contents.
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];

/// The longest length field read, in bytes after the first. Two cover 64 KiB, more than any
/// name in a certificate; longer forms are refused rather than trusted.
const LENGTH_BYTES_MAX: usize = 2;

/// Splits one DER element off the front of `input`: (tag, contents, rest). `None` on anything
/// malformed or truncated; lengths are checked against what is left before slicing.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let length_bytes = usize::from(first & 0x7f);
        if length_bytes == 0 || length_bytes > LENGTH_BYTES_MAX || rest.len() < length_bytes {
            return None;
        }
        let (length_field, rest) = rest.split_at(length_bytes);
        let length = length_field
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, rest)
    };
    if rest.len() < length {
        return None;
    }
    let (contents, rest) = rest.split_at(length);
    Some((tag, contents, rest))
}

/// The first common name in a DER distinguished name given without its outer SEQUENCE header
/// (as webpki's `Cert::subject` returns it): a SEQUENCE OF SET OF { type OID, value }.
/// A tiny walk instead of a full X.509 parser dependency, for one attribute of an already
/// parsed certificate.
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (tag, mut relative_name, rest) = der_element(name)?;
        name = rest;
        if tag != TAG_SET {
            return None;
        }
        while !relative_name.is_empty() {
            let (tag, attribute, rest) = der_element(relative_name)?;
            relative_name = rest;
            if tag != TAG_SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_element(attribute)?;
            if tag != TAG_OID || oid != OID_COMMON_NAME {
                continue;
            }
            let (tag, text, _) = der_element(value)?;
            return match tag {
                // IA5 and Printable are ASCII subsets, so valid UTF-8 too.
                TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING => {
                    String::from_utf8(text.to_vec()).ok()
                }
                // Teletex, BMP, Universal strings: legacy encodings no node certificate uses.
                _ => None,
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn certificate(common_name: Option<&str>, dns_names: &[&str]) -> Vec<u8> {
        let names: Vec<String> = dns_names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "driftless");
        if let Some(common_name) = common_name {
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn first_dns_name_wins_over_common_name() {
        let der = certificate(Some("from-cn"), &["edge-1", "localhost"]);
        assert_eq!(certificate_identity(&der).as_deref(), Some("edge-1"));
    }

    #[test]
    fn common_name_when_no_dns_name() {
        let der = certificate(Some("solo"), &[]);
        assert_eq!(certificate_identity(&der).as_deref(), Some("solo"));
    }

    #[test]
    fn wildcard_dns_names_are_skipped() {
        let der = certificate(Some("from-cn"), &["*.cluster.local"]);
        assert_eq!(certificate_identity(&der).as_deref(), Some("from-cn"));
    }

    #[test]
    fn nothing_named_is_none() {
        let der = certificate(None, &[]);
        assert_eq!(certificate_identity(&der), None);
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(certificate_identity(b"not a certificate"), None);
        assert_eq!(certificate_identity(&[]), None);
    }

    #[test]
    fn truncated_names_are_none_not_panics() {
        // A SET claiming more bytes than exist, a long-form length, an over-long length field.
        assert_eq!(common_name(&[TAG_SET, 0x05, 0x30]), None);
        assert_eq!(common_name(&[TAG_SET, 0x81]), None);
        assert_eq!(common_name(&[TAG_SET, 0x83, 0x00, 0x00, 0x01, 0x00]), None);
    }
}
