//! Objects whose properties depend on the value of their first one (`Schema::Tagged`): a
//! union of object schemas told apart by a property each requires with its own string values
//! (a discriminated union: Pydantic's `Field(discriminator=...)`, zod's
//! `discriminatedUnion`, OpenAI's `anyOf` of objects), and a tool call (`name` first, then the
//! named function's `arguments`). The automaton has the tag written first; once its value is
//! written, the object is that branch's.

use crate::runtime::json_mode::{Functions, Property, Schema};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Tagged {
    /// The tag's name (JSON text between the quotes).
    pub key: Vec<u8>,
    /// Each value of the tag (JSON text between the quotes) and its branch (a
    /// `Schema::Object` that has the tag).
    pub branches: Vec<(Vec<u8>, Arc<Schema>)>,
}

impl Tagged {
    /// A tool call: `{"name": N, "arguments": A}`, A what function N's parameters allow.
    pub fn call(fns: &Functions) -> Tagged {
        let branches = fns
            .iter()
            .map(|(name, params)| {
                let object = Schema::Object(vec![
                    Property {
                        name: b"name".to_vec(),
                        schema: Arc::new(Schema::String(Some(vec![name.clone()]))),
                        required: true,
                    },
                    Property {
                        name: b"arguments".to_vec(),
                        schema: params.clone(),
                        required: true,
                    },
                ]);
                (name.clone(), Arc::new(object))
            })
            .collect();
        Tagged {
            key: b"name".to_vec(),
            branches,
        }
    }

    /// The union of `objects` (`Schema::Object`s) told apart by a property every one requires
    /// as a string `enum` / `const`, no value shared between two: the first such property of
    /// the first object. `None` when there is none.
    pub fn discriminate(objects: &[Arc<Schema>]) -> Option<Tagged> {
        let props = |s: &Schema| match s {
            Schema::Object(p) => Some(p.clone()),
            _ => None,
        };
        let first = props(&objects[0])?;
        let values = |o: &Arc<Schema>, key: &[u8]| -> Option<Vec<Vec<u8>>> {
            let p = props(o)?
                .into_iter()
                .find(|p| p.name == key && p.required)?;
            match &*p.schema {
                Schema::String(Some(v)) => Some(v.clone()),
                _ => None,
            }
        };
        first.iter().find_map(|k| {
            let mut branches: Vec<(Vec<u8>, Arc<Schema>)> = Vec::new();
            for o in objects {
                for v in values(o, &k.name)? {
                    if branches.iter().any(|(w, _)| *w == v) {
                        return None;
                    }
                    branches.push((v, o.clone()));
                }
            }
            Some(Tagged {
                key: k.name.clone(),
                branches,
            })
        })
    }

    /// The object as it opens: the tag only, one of its values.
    pub fn opening(&self) -> Arc<Schema> {
        let values = self.branches.iter().map(|(v, _)| v.clone()).collect();
        Arc::new(Schema::Object(vec![Property {
            name: self.key.clone(),
            schema: Arc::new(Schema::String(Some(values))),
            required: true,
        }]))
    }

    /// The branch of tag value `value` and the tag's index among its properties.
    pub fn branch(&self, value: &[u8]) -> Option<(Arc<Schema>, usize)> {
        let (_, object) = self.branches.iter().find(|(v, _)| v == value)?;
        let Schema::Object(props) = &**object else {
            return None;
        };
        let i = props.iter().position(|p| p.name == self.key)?;
        Some((object.clone(), i))
    }
}
