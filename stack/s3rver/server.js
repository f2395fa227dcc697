// The stack's S3 object store (stack/objectstore.py starts it): s3rver, which keeps each object
// as a file under S3_DIRECTORY, with four changes made here rather than in a fork:
//   - its one key pair is the stack's generated one (s3rver's built-in S3RVER/S3RVER is revoked);
//   - a request that is not signed gets 403 (s3rver itself serves anonymous reads and writes);
//   - an AWS signature v4 (Authorization header or presigned URL) is verified against the secret
//     key (s3rver only looks the access key id up);
//   - an object is written to a partial file, fsynced and renamed, and its metadata (what makes
//     it listed and readable) written last, also by rename: s3rver writes in place and answers
//     before the file is flushed, so a kill -9 could leave a truncated object that reads as whole.
// Environment: S3RVER_PREFIX (the folder `npm ci` installed s3rver into), S3_DIRECTORY, S3_HOST,
// S3_PORT, S3_BUCKET, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY.
'use strict';

const crypto = require('crypto');
const http = require('http');
const path = require('path');
const { Readable, Transform } = require('stream');
const { pipeline } = require('stream/promises');

const env = process.env;
const installed = name => require(path.join(env.S3RVER_PREFIX, 'node_modules', name));
const S3rver = installed('s3rver');
const AWSAccount = installed('s3rver/lib/models/account');
const FilesystemStore = installed('s3rver/lib/stores/filesystem');
const S3Object = installed('s3rver/lib/models/object');
const fs = installed('fs-extra');
const { pick, pickBy } = installed('lodash');

const HEALTH = '/_stack/health';

async function fsyncFile(file) {
  const handle = await fs.promises.open(file, 'r+');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function writeAtomic(file, data) {
  const partial = `${file}.partial-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  await fs.writeFile(partial, data);
  await fsyncFile(partial);
  await fs.rename(partial, file);
}

FilesystemStore.prototype.putMetadata = async function (bucket, key, metadata, md5) {
  const json = {
    ...pick(metadata, S3Object.ALLOWED_METADATA),
    ...pickBy(metadata, (value, name) => name.startsWith('x-amz-meta-')),
  };
  if (md5) await writeAtomic(this.getResourcePath(bucket, key, 'object.md5'), md5);
  await writeAtomic(this.getResourcePath(bucket, key, 'metadata.json'), JSON.stringify(json, null, 2));
};

FilesystemStore.prototype.putObject = async function (object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.mkdirp(path.dirname(objectPath));
  // Not ending in ._S3rver_object: listings skip it until it is renamed.
  const partial = `${objectPath}.partial-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  const md5 = crypto.createHash('md5');
  let size = 0;
  const source = Buffer.isBuffer(object.content) ? Readable.from([object.content]) : object.content;
  const count = new Transform({
    transform(chunk, encoding, callback) {
      md5.update(chunk);
      size += chunk.length;
      callback(null, chunk);
    },
  });
  try {
    await pipeline(source, count, fs.createWriteStream(partial));
    await fsyncFile(partial);
  } catch (err) {
    await fs.remove(partial);
    throw err;
  }
  const digest = md5.digest('hex');
  // From here until the new metadata is in place the key reads as absent, never as old
  // metadata over new bytes.
  await fs.remove(this.getResourcePath(object.bucket, object.key, 'metadata.json'));
  await fs.rename(partial, objectPath);
  await this.putMetadata(object.bucket, object.key, object.metadata, digest);
  return { size, md5: digest };
};

// RFC 3986 encoding as AWS canonicalises it (encodeURIComponent leaves !'()* alone).
const awsEncode = text => encodeURIComponent(text).replace(/[!'()*]/g, c => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
const hmac = (key, data) => crypto.createHmac('sha256', key).update(data, 'utf8').digest();
const sha256 = data => crypto.createHash('sha256').update(data, 'utf8').digest('hex');

// The parts of a signature v4: from the Authorization header, or from a presigned URL's query
// (MLflow's server answers artifact downloads with a redirect to one); null when there is none.
function signatureOf(request, query) {
  const header = request.headers.authorization;
  if (header) {
    const match = /^AWS4-HMAC-SHA256 Credential=([^,]+), ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$/.exec(header);
    if (!match) return { error: 'Only AWS signature version 4 (AWS4-HMAC-SHA256) is accepted' };
    return { credential: match[1], signedHeaders: match[2], signature: match[3], date: request.headers['x-amz-date'] || '',
      payload: request.headers['x-amz-content-sha256'] || 'UNSIGNED-PAYLOAD', query };
  }
  if (!query.has('X-Amz-Signature')) return null;
  const date = query.get('X-Amz-Date') || '';
  const stamp = Date.parse(date.replace(/^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/, '$1-$2-$3T$4:$5:$6Z'));
  if (!(stamp + 1000 * Number(query.get('X-Amz-Expires') || 0) >= Date.now())) return { error: 'The presigned URL has expired' };
  const rest = new URLSearchParams(query);
  rest.delete('X-Amz-Signature');
  return { credential: query.get('X-Amz-Credential') || '', signedHeaders: query.get('X-Amz-SignedHeaders') || '',
    signature: query.get('X-Amz-Signature'), date, payload: 'UNSIGNED-PAYLOAD', query: rest };
}

// Why a request is refused, or null when its signature v4 is the stack's.
function refusal(request) {
  const [path, rawQuery = ''] = request.url.split(/\?(.*)/s);
  const found = signatureOf(request, new URLSearchParams(rawQuery.replace(/\+/g, '%2B')));
  if (!found) return 'Anonymous requests are refused: sign them with the stack\'s keys (.stack/env.sh)';
  if (found.error) return found.error;
  const [keyId, date, region, service, terminal] = found.credential.split('/');
  if (keyId !== env.S3_ACCESS_KEY_ID) return 'The access key id is not the stack\'s';
  if (terminal !== 'aws4_request') return 'The credential scope is not a signature v4 scope';
  const headers = found.signedHeaders.split(';').map(name =>
    `${name}:${String(request.headers[name] ?? '').trim().replace(/\s+/g, ' ')}\n`).join('');
  const query = [...found.query].map(([key, value]) => [awsEncode(key), awsEncode(value)])
    .sort(([k1, v1], [k2, v2]) => (k1 < k2 ? -1 : k1 > k2 ? 1 : v1 < v2 ? -1 : v1 > v2 ? 1 : 0))
    .map(([key, value]) => `${key}=${value}`).join('&');
  const canonical = [request.method, path, query, headers, found.signedHeaders, found.payload].join('\n');
  const scope = `${date}/${region}/${service}/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', found.date, scope, sha256(canonical)].join('\n');
  const key = [date, region, service, 'aws4_request'].reduce(hmac, `AWS4${env.S3_SECRET_ACCESS_KEY}`);
  const expected = Buffer.from(hmac(key, toSign).toString('hex'));
  const given = Buffer.from(found.signature);
  return expected.length === given.length && crypto.timingSafeEqual(expected, given)
    ? null : 'The request signature does not match: check the secret key (.stack/env.sh)';
}

function denied(response, why) {
  response.writeHead(403, { 'Content-Type': 'application/xml' });
  response.end(`<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>${why}</Message></Error>`);
}

async function main() {
  for (const name of ['S3RVER_PREFIX', 'S3_DIRECTORY', 'S3_PORT', 'S3_BUCKET', 'S3_ACCESS_KEY_ID', 'S3_SECRET_ACCESS_KEY']) {
    if (!env[name]) throw new Error(`the environment variable ${name} is not set (stack/objectstore.py sets it)`);
  }
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(env.S3_ACCESS_KEY_ID, env.S3_SECRET_ACCESS_KEY);
  await fs.mkdirp(env.S3_DIRECTORY);
  const app = new S3rver({ directory: env.S3_DIRECTORY, vhostBuckets: false, configureBuckets: [{ name: env.S3_BUCKET }] });
  await app.configureBuckets();
  const handle = app.callback();
  const server = http.createServer((request, response) => {
    if (request.url === HEALTH) {
      response.writeHead(200, { 'Content-Type': 'text/plain' });
      response.end('ok\n');
    } else {
      let why;
      try {
        why = refusal(request);
      } catch (err) {
        why = 'The request could not be read as a signed S3 request';  // e.g. a malformed %-escape
      }
      if (why) console.log(`refused ${request.method} ${request.url}: ${why}`);
      why ? denied(response, why) : handle(request, response);
    }
  });
  server.listen(Number(env.S3_PORT), env.S3_HOST || '127.0.0.1', () => {
    console.log(`s3rver listening on ${env.S3_HOST || '127.0.0.1'}:${env.S3_PORT}, objects in ${env.S3_DIRECTORY}`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch(err => {
  console.error(`the object store did not start: ${err.message}`);
  process.exit(1);
});
