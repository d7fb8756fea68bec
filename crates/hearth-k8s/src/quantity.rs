//! Kubernetes resource quantities (`500m`, `2`, `512Mi`, `1G`) as a Sandbox's spec and a node's capacity
//! write them, and their conversion to the units hearth admits in: whole vCPUs and MiB of memory.
//! Pure parsing, no I/O.

use std::borrow::Cow;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A quantity as written in YAML: a string (`"500m"`, `"1Gi"`) or a bare integer (`cpu: 2`).
/// Kept as written so objects round-trip unchanged; parsed when used.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Quantity(pub String);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("invalid quantity {0:?}: expected a decimal number with an optional suffix (m, k, M, G, T, Ki, Mi, Gi, Ti), e.g. 500m, 2, 512Mi")]
    Invalid(String),
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
}

impl Quantity {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// CPU as whole vCPUs, rounded up (a VM cannot have half a vCPU): `500m` -> 1, `2` -> 2.
    pub fn to_vcpus(&self) -> Result<u32, QuantityError> {
        let v = self.ceil_in_units(1)?;
        u32::try_from(v).map_err(|_| QuantityError::TooLarge(self.0.clone()))
    }

    /// Memory in MiB, rounded up: `512Mi` -> 512, `1G` -> 954, `1Gi` -> 1024.
    pub fn to_mib(&self) -> Result<u64, QuantityError> {
        let v = self.ceil_in_units(1 << 20)?;
        u64::try_from(v).map_err(|_| QuantityError::TooLarge(self.0.clone()))
    }

    /// The value divided by `unit`, rounded up.
    fn ceil_in_units(&self, unit: u128) -> Result<u128, QuantityError> {
        let bad = || QuantityError::Invalid(self.0.clone());
        let big = || QuantityError::TooLarge(self.0.clone());
        let text = self.0.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let (mul, div): (u128, u128) = match suffix {
            "" => (1, 1),
            "m" => (1, 1000),
            "k" => (1_000, 1),
            "M" => (1_000_000, 1),
            "G" => (1_000_000_000, 1),
            "T" => (1_000_000_000_000, 1),
            "Ki" => (1 << 10, 1),
            "Mi" => (1 << 20, 1),
            "Gi" => (1 << 30, 1),
            "Ti" => (1 << 40, 1),
            _ => return Err(bad()),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
            return Err(bad());
        }
        let digits = format!("{int}{frac}");
        let mantissa: u128 = digits.parse().map_err(|_| bad())?;
        let den = 10u128.pow(frac.len() as u32) * div * unit;
        let num = mantissa.checked_mul(mul).ok_or_else(big)?;
        Ok(num.div_ceil(den))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntOrString {
            Int(i64),
            Float(f64),
            Str(String),
        }
        Ok(match IntOrString::deserialize(d)? {
            IntOrString::Int(i) => Quantity(i.to_string()),
            IntOrString::Float(f) => Quantity(f.to_string()),
            IntOrString::Str(s) => Quantity(s),
        })
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    // The apiserver's own quantities are int-or-string: `cpu: 2` and `cpu: "500m"` both validate.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rounds_up_to_whole_vcpus() {
        assert_eq!(Quantity::new("500m").to_vcpus(), Ok(1));
        assert_eq!(Quantity::new("1000m").to_vcpus(), Ok(1));
        assert_eq!(Quantity::new("1001m").to_vcpus(), Ok(2));
        assert_eq!(Quantity::new("2").to_vcpus(), Ok(2));
        assert_eq!(Quantity::new("1.5").to_vcpus(), Ok(2));
    }

    #[test]
    fn memory_in_mib_rounds_up() {
        assert_eq!(Quantity::new("512Mi").to_mib(), Ok(512));
        assert_eq!(Quantity::new("1Gi").to_mib(), Ok(1024));
        assert_eq!(Quantity::new("1G").to_mib(), Ok(954));
        assert_eq!(Quantity::new("1048576").to_mib(), Ok(1));
        assert_eq!(Quantity::new("1048577").to_mib(), Ok(2));
        assert_eq!(Quantity::new("0.5Gi").to_mib(), Ok(512));
    }

    #[test]
    fn garbage_is_rejected_with_the_input_named() {
        for bad in ["", "abc", "1.2.3", "5Xi", "-1", "."] {
            let err = Quantity::new(bad).to_mib().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn yaml_integers_and_strings_both_parse() {
        let q: Quantity = serde_json::from_str("2").unwrap();
        assert_eq!(q, Quantity::new("2"));
        let q: Quantity = serde_json::from_str("\"250m\"").unwrap();
        assert_eq!(q.to_vcpus(), Ok(1));
    }
}
