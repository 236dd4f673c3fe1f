//! PHPMQ v1.2's negotiation, without I/O: protocol versions (the HELLO's and WELCOME's 06
//! packet), the answer to a HELLO, the dialect it gives the connection, and feature lists (the
//! 08 packet).
//!
//! Rule 1 of the v1.2 spec: the answer is the lower of the client's version and the server's
//! ([`SERVER_VERSION`]), compared number by number, so `1.10` is above `1.2`. Which frame may be
//! a HELLO (only the first) is the connection's business.

use crate::codec::Dialect;
use crate::outgoing::Outgoing;
use std::fmt;

/// A protocol version, `MAJOR.MINOR`. Ordered number by number: `1.10` > `1.2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

/// The highest version this server speaks.
pub const SERVER_VERSION: Version = Version::V1_2;

/// Why a 06 packet is not a version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed protocol version {preview:?} (expected MAJOR.MINOR in decimal digits)")]
pub struct VersionError {
    /// The start of what was sent, for the log and the ERROR text.
    pub preview: String,
}

impl Version {
    pub const V1_0: Version = Version { major: 1, minor: 0 };
    pub const V1_1: Version = Version { major: 1, minor: 1 };
    pub const V1_2: Version = Version { major: 1, minor: 2 };

    /// Parses `MAJOR.MINOR`: two non-empty runs of ASCII digits and one dot, nothing else (no
    /// sign, space or third part). Leading zeros are allowed (`1.02` is `1.2`), and a number
    /// beyond `u32::MAX` counts as `u32::MAX`: it is still higher than anything we speak, which
    /// is all the comparison needs.
    pub fn parse(bytes: &[u8]) -> Result<Version, VersionError> {
        let malformed = || VersionError {
            preview: preview(bytes),
        };
        let dot = bytes
            .iter()
            .position(|&b| b == b'.')
            .ok_or_else(malformed)?;
        let (major, minor) = (&bytes[..dot], &bytes[dot + 1..]);
        Ok(Version {
            major: saturating_u32(major).ok_or_else(malformed)?,
            minor: saturating_u32(minor).ok_or_else(malformed)?,
        })
    }

    /// The wire form, e.g. `1.2`.
    pub fn to_wire(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The value of a non-empty run of ASCII digits, saturated at `u32::MAX`.
fn saturating_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u32, |n, &c| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u32::from(c - b'0')))
            .unwrap_or(u32::MAX)
    }))
}

/// The start of client bytes, printable, for messages.
pub(crate) fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned()
}

/// The version both sides speak: the lower of the client's and [`SERVER_VERSION`].
pub fn negotiate(client: Version) -> Version {
    client.min(SERVER_VERSION)
}

/// The dialect a connection speaks after agreeing on `version`; `None` below 1.0 (a version
/// this server never spoke: there is nothing in common, see [`respond`]).
pub fn dialect_for(version: Version) -> Option<Dialect> {
    match version {
        Version { major: 0, .. } => None,
        Version { major: 1, minor: 0 } => Some(Dialect::V10),
        Version { major: 1, minor: 1 } => Some(Dialect::V11),
        _ => Some(Dialect::V12),
    }
}

/// A HELLO for a version below 1.0: the server speaks nothing that old.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: the client speaks up to {client}, the server 1.0 to {SERVER_VERSION}")]
pub struct NoCommonVersion {
    pub client: Version,
}

/// The answer to a first-frame HELLO for `client`: the connection's new dialect and the
/// WELCOME to send. It lists `served` (the server's features, [`Features::served`]) when the
/// answer is 1.2, and no feature for 1.0 or 1.1: every feature is a v1.2 one, and such a
/// connection gets none (rule 1). Below 1.0 there is no common version: the caller answers
/// ERROR 400 and closes, as for any HELLO it cannot use.
pub fn respond(client: Version, served: Features) -> Result<(Dialect, Outgoing), NoCommonVersion> {
    let version = negotiate(client);
    let dialect = dialect_for(version).ok_or(NoCommonVersion { client })?;
    let features = if dialect.is_v12() {
        served
    } else {
        Features::NONE
    };
    Ok((dialect, Outgoing::Welcome { version, features }))
}

/// A feature of v1.2 (rule 8), as named in the 08 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    Confirm,
    Stats,
    Delay,
    Attempts,
    Lease,
    DeadLetter,
    Durable,
}

impl Feature {
    /// In the order the server lists them.
    pub const ALL: [Feature; 7] = [
        Feature::Confirm,
        Feature::Stats,
        Feature::Delay,
        Feature::Attempts,
        Feature::Lease,
        Feature::DeadLetter,
        Feature::Durable,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Feature::Confirm => "confirm",
            Feature::Stats => "stats",
            Feature::Delay => "delay",
            Feature::Attempts => "attempts",
            Feature::Lease => "lease",
            Feature::DeadLetter => "dead-letter",
            Feature::Durable => "durable",
        }
    }

    pub fn from_word(word: &[u8]) -> Option<Feature> {
        Feature::ALL
            .into_iter()
            .find(|f| f.word().as_bytes() == word)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of features: the 08 packet of a HELLO (what the client wants) or of a WELCOME (what
/// the server serves). Words this server does not know are dropped when parsing: a newer
/// client may ask for more than we serve, and the WELCOME's list tells it what it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(u8);

/// Why an 08 packet is not a feature list.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed feature list {preview:?} (expected words of printable ASCII separated by single spaces)")]
pub struct FeaturesError {
    pub preview: String,
}

impl Features {
    pub const NONE: Features = Features(0);

    /// What this server serves (rule 8): `confirm stats delay attempts lease` always,
    /// `dead-letter` when started with a maximum delivery count, `durable` when receipts can
    /// wait for the disk.
    pub fn served(dead_letter: bool, durable: bool) -> Features {
        let mut features = [
            Feature::Confirm,
            Feature::Stats,
            Feature::Delay,
            Feature::Attempts,
            Feature::Lease,
        ]
        .into_iter()
        .collect::<Features>();
        if dead_letter {
            features.insert(Feature::DeadLetter);
        }
        if durable {
            features.insert(Feature::Durable);
        }
        features
    }

    /// Parses an 08 packet: zero or more words separated by single spaces, each word one or
    /// more bytes of printable ASCII other than space (no leading, trailing or double space).
    /// Unknown words are ignored (see [`Features`]); a repeated word counts once.
    pub fn parse(bytes: &[u8]) -> Result<Features, FeaturesError> {
        let mut features = Features::NONE;
        if bytes.is_empty() {
            return Ok(features);
        }
        for word in bytes.split(|&b| b == b' ') {
            if word.is_empty() || !word.iter().all(|b| b.is_ascii_graphic()) {
                return Err(FeaturesError {
                    preview: preview(bytes),
                });
            }
            if let Some(feature) = Feature::from_word(word) {
                features.insert(feature);
            }
        }
        Ok(features)
    }

    pub fn contains(self, feature: Feature) -> bool {
        self.0 & feature.bit() != 0
    }

    pub fn insert(&mut self, feature: Feature) {
        self.0 |= feature.bit();
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |&f| self.contains(f))
    }

    /// The wire form: the words in [`Feature::ALL`] order, separated by single spaces.
    pub fn to_wire(self) -> String {
        self.iter().map(Feature::word).collect::<Vec<_>>().join(" ")
    }
}

impl FromIterator<Feature> for Features {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Features {
        let mut features = Features::NONE;
        for feature in iter {
            features.insert(feature);
        }
        features
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_wire())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn versions_compare_number_by_number() {
        assert!(v("1.10") > v("1.2"));
        assert!(v("1.2") > v("1.1"));
        assert!(v("2.0") > v("1.99"));
        assert_eq!(v("1.02"), Version::V1_2);
        assert_eq!(v("0001.0002"), Version::V1_2);
        assert_eq!(
            v("1.99999999999999999999"),
            Version {
                major: 1,
                minor: u32::MAX
            }
        );
        assert_eq!(Version::V1_2.to_wire(), "1.2");
    }

    #[test]
    fn malformed_versions() {
        for bad in [
            "", "1", "1.", ".2", "1.2.3", "1,2", " 1.2", "1.2 ", "+1.2", "-1.2", "v1.2", "1.2\n",
            "1..2", "１.２",
        ] {
            assert!(Version::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let error = Version::parse(b"one.two").unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed protocol version \"one.two\" (expected MAJOR.MINOR in decimal digits)"
        );
    }

    #[test]
    fn negotiation_takes_the_lower_version() {
        assert_eq!(negotiate(v("1.2")), Version::V1_2);
        assert_eq!(negotiate(v("1.10")), Version::V1_2);
        assert_eq!(negotiate(v("2.0")), Version::V1_2);
        assert_eq!(negotiate(v("1.1")), Version::V1_1);
        assert_eq!(negotiate(v("1.0")), Version::V1_0);
        assert_eq!(negotiate(v("0.9")), v("0.9"));
        assert_eq!(dialect_for(negotiate(v("1.2"))), Some(Dialect::V12));
        assert_eq!(dialect_for(negotiate(v("1.10"))), Some(Dialect::V12));
        assert_eq!(dialect_for(negotiate(v("2.0"))), Some(Dialect::V12));
        assert_eq!(dialect_for(negotiate(v("1.1"))), Some(Dialect::V11));
        assert_eq!(dialect_for(negotiate(v("1.0"))), Some(Dialect::V10));
        assert_eq!(dialect_for(negotiate(v("0.9"))), None);
    }

    #[test]
    fn a_hello_is_answered_with_the_version_and_the_served_features() {
        let served = Features::served(false, false);
        assert_eq!(
            respond(v("1.10"), served),
            Ok((
                Dialect::V12,
                Outgoing::Welcome {
                    version: Version::V1_2,
                    features: served
                }
            ))
        );
        assert_eq!(
            respond(v("1.1"), served),
            Ok((
                Dialect::V11,
                Outgoing::Welcome {
                    version: Version::V1_1,
                    features: Features::NONE
                }
            ))
        );
        let (dialect, _) = respond(v("1.0"), served).unwrap();
        assert_eq!(dialect, Dialect::V10);
        assert_eq!(
            respond(v("0.9"), served),
            Err(NoCommonVersion { client: v("0.9") })
        );
    }

    #[test]
    fn served_features() {
        assert_eq!(
            Features::served(false, false).to_wire(),
            "confirm stats delay attempts lease"
        );
        assert_eq!(
            Features::served(true, false).to_wire(),
            "confirm stats delay attempts lease dead-letter"
        );
        assert_eq!(
            Features::served(true, true).to_wire(),
            "confirm stats delay attempts lease dead-letter durable"
        );
        assert_eq!(
            Features::served(false, true).to_wire(),
            "confirm stats delay attempts lease durable"
        );
    }

    #[test]
    fn feature_lists_parse_and_ignore_unknown_words() {
        let wanted = Features::parse(b"durable confirm teleport confirm").unwrap();
        assert!(wanted.contains(Feature::Durable) && wanted.contains(Feature::Confirm));
        assert!(!wanted.contains(Feature::Lease));
        assert_eq!(wanted.to_wire(), "confirm durable");
        assert_eq!(Features::parse(b""), Ok(Features::NONE));
        let all = Feature::ALL.into_iter().collect::<Features>();
        assert_eq!(Features::parse(all.to_wire().as_bytes()), Ok(all));
        for bad in [
            &b" confirm"[..],
            b"confirm ",
            b"confirm  stats",
            b" ",
            b"confirm\tstats",
            b"conf\xffirm",
            b"confirm\nstats",
        ] {
            assert!(Features::parse(bad).is_err(), "{bad:?}");
        }
    }
}
