//! Closed sets of names (clone strategies, benchmark suites and units, ...), each spelled
//! in one place.
//!
//! A type implements [`Named`]: its `name` is the one table of its names, `all` lists
//! its values. [`by_name!`] derives `Display` and serde from that table (and, asked,
//! `clap::ValueEnum`), so the JSON, the command line and the messages cannot drift apart.

/// A closed set of values, each with one name.
pub trait Named: Copy + PartialEq + 'static {
    /// What a value is, for messages: `clone strategy`.
    const KIND: &'static str;

    /// Every value, in the order lists show them.
    fn all() -> impl Iterator<Item = Self>;

    /// The value's name, in JSON, on the command line and in messages.
    fn name(self) -> &'static str;

    /// The value called `name`.
    fn from_name(name: &str) -> Option<Self> {
        Self::all().find(|v| v.name() == name)
    }

    /// Every name, in order, separated by commas.
    fn name_list() -> String {
        Self::all().map(Self::name).collect::<Vec<_>>().join(", ")
    }
}

/// Why `name` is none of `T`'s.
pub fn unknown<T: Named>(name: &str) -> String {
    format!("unknown {} {name:?}: expected one of {}", T::KIND, T::name_list())
}

/// A [`Named`] value from its name, as serde reads it.
pub fn deserialize<'de, T: Named, D: serde::Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let name = <String as serde::Deserialize>::deserialize(d)?;
    T::from_name(&name).ok_or_else(|| serde::de::Error::custom(unknown::<T>(&name)))
}

/// Implements `Display` (padded as a `str` is), `Serialize` and `Deserialize` of a
/// [`Named`] type as its name.
/// `by_name!(T, value_enum)` also implements `clap::ValueEnum` from `T::ALL` (every
/// value, a constant) and `T::help` (a line of `--help` per value).
macro_rules! by_name {
    ($t:ty) => {
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad($crate::names::Named::name(*self))
            }
        }

        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str($crate::names::Named::name(*self))
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                $crate::names::deserialize(d)
            }
        }
    };
    ($t:ty,value_enum) => {
        $crate::names::by_name!($t);

        impl ::clap::ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                &<$t>::ALL
            }

            fn to_possible_value(&self) -> ::std::option::Option<::clap::builder::PossibleValue> {
                let name = $crate::names::Named::name(*self);
                Some(::clap::builder::PossibleValue::new(name).help(self.help()))
            }
        }
    };
}
pub(crate) use by_name;

/// Implements `Serialize` and `Deserialize` of a type as its `Display` and `FromStr`
/// text, for a set of names some of which carry a parameter (`chain3`), which
/// [`Named`] cannot list. `FromStr::Err` must be `String`, the reason.
macro_rules! by_text {
    ($t:ty) => {
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let text = <::std::borrow::Cow<'de, str> as ::serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use by_text;

/// Declares an enum whose values without a parameter each have one name, in one table:
/// `Variant = "name"`, then, after a `;`, the variants that carry a parameter (their
/// text is the type's own `Display`). Generates `PLAIN`, every value without a
/// parameter in table order, and `plain_name`, the name of one of them.
macro_rules! plain_names {
    (
        $(#[$meta:meta])*
        $vis:vis enum $t:ident {
            $( $(#[$vmeta:meta])* $v:ident = $name:literal, )*
            ;
            $( $(#[$pmeta:meta])* $p:ident($pt:ty), )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $t {
            $( $(#[$vmeta])* $v, )*
            $( $(#[$pmeta])* $p($pt), )*
        }

        impl $t {
            /// Every value without a parameter, in table order.
            pub const PLAIN: &'static [$t] = &[$($t::$v,)*];

            /// The name of a value without a parameter; `None` for one with.
            pub fn plain_name(self) -> ::std::option::Option<&'static str> {
                match self {
                    $( $t::$v => Some($name), )*
                    $( $t::$p(_) => None, )*
                }
            }

            /// The value without a parameter called `name`.
            fn from_plain_name(name: &str) -> ::std::option::Option<Self> {
                Self::PLAIN.iter().copied().find(|v| v.plain_name() == Some(name))
            }
        }
    };
}
pub(crate) use plain_names;

/// `text` as a number written the one way `Display` writes it (no sign, no leading
/// zero), so that what it is read from is what it is written back as.
pub(crate) fn canonical_number(text: &str) -> Option<u32> {
    let n: u32 = text.parse().ok()?;
    (n.to_string() == text).then_some(n)
}

/// Checks that every value of `T` has a name of its own, and is written and read back
/// by it: by [`Named::from_name`], `Display` and serde.
#[cfg(test)]
pub(crate) fn check_round_trips<T>()
where
    T: Named + std::fmt::Debug + std::fmt::Display + serde::Serialize + serde::de::DeserializeOwned,
{
    let names: Vec<&str> = T::all().map(T::name).collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "every {} has a name of its own: {names:?}", T::KIND);
    for v in T::all() {
        let name = v.name();
        assert_eq!(T::from_name(name), Some(v));
        assert_eq!(v.to_string(), name);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, serde_json::to_string(name).unwrap());
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
        assert_eq!(serde_json::from_value::<T>(name.into()).unwrap(), v);
    }
    let e = serde_json::from_str::<T>("\"no such name\"").unwrap_err().to_string();
    assert!(e.contains(&T::name_list()), "{e}");
}

/// Checks that clap knows `T`'s values by their names, in order.
#[cfg(test)]
pub(crate) fn check_value_enum<T: Named + clap::ValueEnum + std::fmt::Debug>() {
    assert_eq!(T::value_variants().to_vec(), T::all().collect::<Vec<_>>());
    for v in T::all() {
        assert_eq!(v.to_possible_value().unwrap().get_name(), v.name());
        assert_eq!(T::from_str(v.name(), false), Ok(v));
    }
}
