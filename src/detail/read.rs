//! Reading the API's answer in one pass, straight into the typed record:
//! each known field through its lenient reader; what is only passed on
//! (unknown fields, tags, the call trail, forms) kept as its JSON text.
//! (serde's `flatten` would first copy every field into a buffer of its
//! own, and a `Value` per field would build a tree to throw away.)

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{CallDetail, CallFragment, Extra, Raw};

/// A known field's reader: the API's type variants to one type.
macro_rules! lenient_type {
    ($name:ident, $value:ty, $expected:literal) => {
        /// One field, read leniently.
        pub struct $name(pub $value);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $value;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expected)
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<$value, E> {
                        Ok(Default::default())
                    }
                    fn visit_none<E: de::Error>(self) -> Result<$value, E> {
                        Ok(Default::default())
                    }
                    fn visit_bool<E: de::Error>(self, v: bool) -> Result<$value, E> {
                        <$name>::from_bool(v)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$value, E> {
                        <$name>::from_i64(v)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$value, E> {
                        <$name>::from_u64(v)
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$value, E> {
                        <$name>::from_f64(v)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$value, E> {
                        <$name>::from_str(v)
                    }
                    fn visit_string<E: de::Error>(self, v: String) -> Result<$value, E> {
                        <$name>::from_string(v)
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<$value, A::Error> {
                        Err(de::Error::custom(concat!($expected, ", got array")))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<$value, A::Error> {
                        Err(de::Error::custom(concat!($expected, ", got object")))
                    }
                }
                d.deserialize_any(V).map($name)
            }
        }
    };
}

lenient_type!(Str, Option<String>, "expected a string");
lenient_type!(Int, Option<i64>, "expected an integer");
lenient_type!(Flag, Option<bool>, "expected a boolean");

fn wrong<T, E: de::Error>(expected: &str, got: &str) -> Result<T, E> {
    Err(E::custom(format!("{expected}, got {got}")))
}

/// As `serde_json` prints a number.
fn number(v: f64) -> String {
    serde_json::Number::from_f64(v).map_or_else(|| v.to_string(), |n| n.to_string())
}

/// `""` is none; numbers and booleans are written as text.
impl Str {
    fn from_bool<E: de::Error>(v: bool) -> Result<Option<String>, E> {
        Ok(Some(v.to_string()))
    }
    fn from_i64<E: de::Error>(v: i64) -> Result<Option<String>, E> {
        Ok(Some(v.to_string()))
    }
    fn from_u64<E: de::Error>(v: u64) -> Result<Option<String>, E> {
        Ok(Some(v.to_string()))
    }
    fn from_f64<E: de::Error>(v: f64) -> Result<Option<String>, E> {
        Ok(Some(number(v)))
    }
    fn from_str<E: de::Error>(v: &str) -> Result<Option<String>, E> {
        Ok((!v.is_empty()).then(|| v.to_owned()))
    }
    fn from_string<E: de::Error>(v: String) -> Result<Option<String>, E> {
        Ok((!v.is_empty()).then_some(v))
    }
}

/// Whole numbers, also as text or as a float without a fraction; blank
/// text is none.
impl Int {
    fn from_bool<E: de::Error>(_: bool) -> Result<Option<i64>, E> {
        wrong("expected an integer", "boolean")
    }
    fn from_i64<E: de::Error>(v: i64) -> Result<Option<i64>, E> {
        Ok(Some(v))
    }
    fn from_u64<E: de::Error>(v: u64) -> Result<Option<i64>, E> {
        Ok(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn from_f64<E: de::Error>(v: f64) -> Result<Option<i64>, E> {
        if v.fract() == 0.0 {
            Ok(Some(v as i64))
        } else {
            Err(E::custom(format!("{} is not an integer", number(v))))
        }
    }
    fn from_str<E: de::Error>(v: &str) -> Result<Option<i64>, E> {
        match v.trim() {
            "" => Ok(None),
            t => (t.parse().map(Some)).map_err(|_| E::custom(format!("{v:?} is not an integer"))),
        }
    }
    fn from_string<E: de::Error>(v: String) -> Result<Option<i64>, E> {
        Int::from_str(&v)
    }
}

/// Booleans, also as 0/1 or their text; blank text is none.
impl Flag {
    fn from_bool<E: de::Error>(v: bool) -> Result<Option<bool>, E> {
        Ok(Some(v))
    }
    fn from_i64<E: de::Error>(v: i64) -> Result<Option<bool>, E> {
        Ok(Some(v != 0))
    }
    fn from_u64<E: de::Error>(v: u64) -> Result<Option<bool>, E> {
        Ok(Some(v != 0))
    }
    fn from_f64<E: de::Error>(v: f64) -> Result<Option<bool>, E> {
        Ok(Some(v != 0.0))
    }
    fn from_str<E: de::Error>(v: &str) -> Result<Option<bool>, E> {
        match v.trim() {
            "" => Ok(None),
            "true" | "1" => Ok(Some(true)),
            "false" | "0" => Ok(Some(false)),
            other => Err(E::custom(format!("{other:?} is not a boolean"))),
        }
    }
    fn from_string<E: de::Error>(v: String) -> Result<Option<bool>, E> {
        Flag::from_str(&v)
    }
}

/// An object, kept as its text; also JSON text of one, and none for
/// `null`, `""` or `[]` (an empty list stands for "none" in several
/// PHP-style APIs).
pub struct Obj(pub Option<Raw>);

impl<'de> Deserialize<'de> for Obj {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use de::Error;
        let raw = Box::<RawValue>::deserialize(d)?;
        let text = raw.get();
        let got = match text.as_bytes().first() {
            Some(b'{') => return Ok(Obj(Some(Raw(raw)))),
            Some(b'n') => return Ok(Obj(None)),
            Some(b'[') if text[1..text.len() - 1].trim().is_empty() => return Ok(Obj(None)),
            Some(b'[') => "array",
            // Some fields are documented as strings holding JSON.
            Some(b'"') => {
                let inner: String = serde_json::from_str(text).map_err(D::Error::custom)?;
                if inner.trim().is_empty() {
                    return Ok(Obj(None));
                }
                return match serde_json::from_str::<Box<RawValue>>(&inner) {
                    Ok(r) if r.get().starts_with('{') => Ok(Obj(Some(Raw(r)))),
                    _ => Err(D::Error::custom("expected an object or JSON text of one")),
                };
            }
            Some(b't' | b'f') => "boolean",
            _ => "number",
        };
        wrong("expected an object", got)
    }
}

/// Any JSON, kept as its text.
impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(Raw)
    }
}

/// A list, each element read as `T`; `null` and blank text are empty.
pub struct List<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("expected an array")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
                Ok(Vec::new())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
                match v.trim() {
                    "" => Ok(Vec::new()),
                    _ => wrong("expected an array", "string"),
                }
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Vec<T>, E> {
                wrong("expected an array", "boolean")
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Vec<T>, E> {
                wrong("expected an array", "number")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Vec<T>, E> {
                wrong("expected an array", "number")
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Vec<T>, E> {
                wrong("expected an array", "number")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(out)
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Vec<T>, A::Error> {
                wrong("expected an array", "object")
            }
        }
        d.deserialize_any(V(PhantomData)).map(List)
    }
}

/// A map key, borrowed from the text when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A record of known fields and the rest.
trait Fields: Default {
    /// Reads the value of `key` if it is a known field; `false` if not.
    fn known<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
    fn extra(&mut self) -> &mut Extra;
    /// After the last field.
    fn finish(&mut self) {}
}

/// Reads a [`Fields`] record; the fields it had are counted.
struct Record<T>(PhantomData<T>);

impl<'de, T: Fields> Visitor<'de> for Record<T> {
    type Value = (T, usize);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(T, usize), A::Error> {
        let mut out = T::default();
        let mut fields = 0;
        while let Some(Key(key)) = map.next_key()? {
            fields += 1;
            if !out.known(&key, &mut map)? {
                let value = map.next_value::<Raw>()?;
                out.extra().insert(key.into_owned(), value);
            }
        }
        out.finish();
        Ok((out, fields))
    }
}

fn record<'de, T: Fields, D: Deserializer<'de>>(d: D) -> Result<(T, usize), D::Error> {
    d.deserialize_map(Record(PhantomData))
}

impl<'de> Deserialize<'de> for CallDetail {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        record(d).map(|(r, _)| r)
    }
}

impl<'de> Deserialize<'de> for CallFragment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        record(d).map(|(r, _)| r)
    }
}

impl Fields for CallDetail {
    fn known<'de, A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<bool, A::Error> {
        match key {
            "session_id" => self.session_id = m.next_value::<Str>()?.0,
            "call_type" => self.call_type = m.next_value::<Int>()?.0,
            "tags" => self.tags = m.next_value::<Obj>()?.0,
            "summary" => self.summary = m.next_value::<Str>()?.0,
            "remark" => self.remark = m.next_value::<Str>()?.0,
            "call_direction" => self.call_direction = m.next_value::<Str>()?.0,
            "ignore_times" => self.ignore_times = m.next_value::<Int>()?.0,
            "satisfaction" => self.satisfaction = m.next_value::<Int>()?.0,
            "record_file" => self.record_file = m.next_value::<Str>()?.0,
            "lists" => self.lists = m.next_value::<List<CallFragment>>()?.0,
            "app_node_list" => self.app_node_list = m.next_value::<Obj>()?.0,
            "is_repeat" => self.is_repeat = m.next_value::<Flag>()?.0,
            "cycle_period" => self.cycle_period = m.next_value::<Int>()?.0,
            "call_in_today_num" => self.call_in_today_num = m.next_value::<Int>()?.0,
            "call_in_all_num" => self.call_in_all_num = m.next_value::<Int>()?.0,
            "associate_datas" => self.associate_datas = m.next_value::<List<Raw>>()?.0,
            "hangup_reason" => self.hangup_reason = m.next_value::<Int>()?.0,
            "hangup_party" => self.hangup_party = m.next_value::<Int>()?.0,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn extra(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

impl Fields for CallFragment {
    fn known<'de, A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<bool, A::Error> {
        match key {
            "service_time" => self.service_time = m.next_value::<Int>()?.0,
            "queue_time" => self.queue_time = m.next_value::<Int>()?.0,
            "ringing_time" => self.ringing_time = m.next_value::<Int>()?.0,
            _ => match self.text(key) {
                Some(field) => *field = m.next_value::<Str>()?.0,
                None => return Ok(false),
            },
        }
        Ok(true)
    }

    fn extra(&mut self) -> &mut Extra {
        &mut self.extra
    }

    /// The spec calls the customer's name `truename`, the API also sends
    /// `customer_name`: this holds whichever is set.
    fn finish(&mut self) {
        if self.customer_name.is_none() {
            self.customer_name = self.truename.clone();
        }
    }
}

impl CallFragment {
    /// The text field called `key`.
    fn text(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "id" => &mut self.id,
            "customer_id" => &mut self.customer_id,
            "customer_name" => &mut self.customer_name,
            "truename" => &mut self.truename,
            "app_type" => &mut self.app_type,
            "service_type" => &mut self.service_type,
            "bussiness_num" => &mut self.bussiness_num,
            "alterting_time" => &mut self.alterting_time,
            "service_start_time" => &mut self.service_start_time,
            "service_stop_time" => &mut self.service_stop_time,
            "answer_time" => &mut self.answer_time,
            "ani" => &mut self.ani,
            "ani_place" => &mut self.ani_place,
            "dnis" => &mut self.dnis,
            "dnis_place" => &mut self.dnis_place,
            "call_direction" => &mut self.call_direction,
            "title" => &mut self.title,
            "agent_num" => &mut self.agent_num,
            "agent_name" => &mut self.agent_name,
            _ => return None,
        })
    }
}

fn not_an_object<T, E: de::Error>(kind: &str) -> Result<T, E> {
    Err(E::custom(format!("data is a {kind}, not an object")))
}

/// The envelope's `data`: an object, or an array whose first element is
/// one (the spec calls it an object array and shows an object); `None`
/// for "no record yet" (`{}`, `[]`, `null`, `""`).
#[derive(Default)]
pub struct Data(pub Option<CallDetail>);

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<CallDetail>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("data as an object")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "" => Ok(None),
                    _ => not_an_object("string"),
                }
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                not_an_object("boolean")
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                not_an_object("number")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                not_an_object("number")
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                not_an_object("number")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let (detail, fields) = Record::<CallDetail>(PhantomData).visit_map(map)?;
                Ok((fields > 0).then_some(detail))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<CallDetail>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(first)
            }
        }
        d.deserialize_any(V).map(Data)
    }
}

pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Str::deserialize(d).map(|s| s.0)
}

pub fn required_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    (Int::deserialize(d)?.0).ok_or_else(|| de::Error::custom("errcode is empty"))
}
