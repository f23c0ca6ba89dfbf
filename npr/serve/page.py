"""The chat page at ``/``: one self-contained HTML document, no build step, no network but the server.

It streams ``/v1/chat/completions`` with ``fetch`` and shows the answer as it decodes: text before
a block, then each block with its guideline, its branches in side-by-side columns filled from the
``npr`` extension chunks while they decode, its takeaway, and finally the answer with
``\\boxed{}`` marked and the engine stats. It uses the report viewer's style sheet and, like the
viewer, writes text only through ``textContent``, so model output cannot inject markup.

Above the chat, the **server panel** shows the whole server, polled from ``GET /live`` (``npr.serve.live``):
running and queued requests, KV blocks in use, and one button per in-flight request from any client (this
page, curl, the ``openai`` client). Clicking one follows it: its text so far, rendered like a chat answer,
with its branches decoding side by side, until it ends.

Test hooks: ``body[data-state]`` is ``ready``, ``streaming``, ``done`` or ``error``;
``body[data-live-columns]`` is the most branch columns seen decoding at once; ``body[data-server-requests]``
the requests the server panel lists; ``body[data-follow]`` the followed request's id and
``body[data-follow-columns]`` the most of its branches seen decoding at once.
"""

from __future__ import annotations

from npr.eval.viewer import page, script_json

CHAT_CSS = """
.chat{max-width:1280px;margin:0 auto;padding:0 18px 140px}
.turn{margin:14px 0}.q{background:#ddf4ff;border-radius:8px;padding:6px 10px;white-space:pre-wrap;display:inline-block;max-width:100%}
.answer{margin-top:8px}.seq{margin:6px 0}.branch.live>.bh::after{content:" · decoding";color:var(--mut)}
.ask{position:fixed;left:0;right:0;bottom:0;background:#fff;border-top:1px solid var(--line);padding:10px 18px}
.ask form{max-width:1280px;margin:0 auto;display:flex;gap:8px;align-items:flex-end}
.ask textarea{flex:1;font:inherit;min-height:44px;max-height:30vh;padding:6px;resize:vertical}
.ask button{font:inherit;padding:8px 14px;border-radius:6px;border:1px solid var(--acc);background:var(--acc);color:#fff;cursor:pointer}
.ask button.stop{background:#fff;color:var(--bad);border-color:var(--bad)}.ask button:disabled{opacity:.5;cursor:default}
.opts{display:flex;gap:10px;font-size:12px;color:var(--mut);margin:0 auto 6px;max-width:1280px}
.server{border:1px solid var(--line);border-radius:8px;padding:8px 10px;margin:10px 0;font-size:13px}
.srv-list{display:flex;flex-direction:column;gap:4px;margin-top:6px}
button.req{text-align:left;font:inherit;background:#fff;border:1px solid var(--line);border-radius:6px;padding:4px 8px;cursor:pointer}
button.req.on{border-color:var(--acc);background:#ddf4ff}.follow{margin-top:8px;border-top:1px dashed var(--line)}
.opts input{width:80px;font:inherit}.err{color:var(--bad);white-space:pre-wrap}.hint{color:var(--mut);font-size:13px}
"""

CHAT_JS = r"""
(function(){
"use strict";
var CFG=JSON.parse(document.getElementById("npr-config").textContent);
var log=document.getElementById("log"),form=document.getElementById("ask"),input=document.getElementById("q"),
 send=document.getElementById("send"),keyBox=document.getElementById("key-box"),keyIn=document.getElementById("key");
var messages=[],busy=null,maxLive=0;
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=String(text);return e;}
function setState(s){document.body.dataset.state=s;}
function headers(){var h={"Content-Type":"application/json"};var k=keyIn.value||sessionStorage.getItem("npr-key");
 if(k){h.Authorization="Bearer "+k;sessionStorage.setItem("npr-key",k);}return h;}
fetch("/health").then(function(r){return r.json();}).then(function(h){
 document.getElementById("mode").textContent="Engine: "+h.mode+" mode.";if(h.auth)keyBox.hidden=false;}).catch(function(){});
function unlabel(t){return t.replace(/^\s*\d+:\s?/,"").trim();}
// The canonical text as a tree: text outside blocks, and per block plans, steps, takeaway.
function parse(text){
 var parts=text.split(/(<\/?(?:guideline|plan|step|takeaway)>)/),items=[{kind:"text",text:""}],blk=null,mode="text";
 function last(){return items[items.length-1];}
 parts.forEach(function(p){
  if(p==="<guideline>"){blk={kind:"block",plans:[],steps:[],take:null,stage:"guideline"};items.push(blk);mode="guide";}
  else if(p==="<plan>"&&blk){blk.plans.push("");mode="plan";}
  else if(p==="</plan>"&&blk){mode="guide";}
  else if(p==="</guideline>"&&blk){blk.stage="branches";mode="steps";}
  else if(p==="<step>"&&blk){blk.steps.push("");mode="step";}
  else if(p==="</step>"&&blk){mode="steps";}
  else if(p==="<takeaway>"&&blk){blk.take="";blk.stage="takeaway";mode="take";}
  else if(p==="</takeaway>"&&blk){blk.stage="done";blk=null;mode="text";items.push({kind:"text",text:""});}
  else if(mode==="plan")blk.plans[blk.plans.length-1]+=p;
  else if(mode==="step")blk.steps[blk.steps.length-1]+=p;
  else if(mode==="take")blk.take+=p;
  else if(mode==="text")last().text+=p;});
 return items;}
function branchText(raw){return unlabel(raw.replace(/<\/?step>/g,""));}
function finalText(pre,text,answer){
 var at=answer!=null?text.lastIndexOf("\\boxed{"+answer+"}"):-1;
 if(at<0){pre.textContent=text;return;}
 var whole="\\boxed{"+answer+"}";pre.appendChild(document.createTextNode(text.slice(0,at)));
 pre.appendChild(el("mark","ans",whole));pre.appendChild(document.createTextNode(text.slice(at+whole.length)));}
function renderBlock(box,b,n,live,ext){
 var exec=ext&&ext.tree.blocks[n]?ext.tree.blocks[n].executed_as_branches:null;
 var blk=el("div","block"+(exec===false?" np":""));blk.dataset.block=n+1;
 var liveCols=live[n+1]||{},cols=Math.max(b.plans.length,b.steps.length,Object.keys(liveCols).length);
 var stage=b.stage==="branches"?"branches decoding":(b.stage==="guideline"?"planning":"joined");
 blk.appendChild(el("div","b-label","Block "+(n+1)+" · "+cols+" branch"+(cols===1?"":"es")+" · "+stage));
 if(b.plans.length){var g=el("div","guide");g.appendChild(el("div","lbl","guideline"));var ol=el("ol");
  b.plans.forEach(function(p){ol.appendChild(el("li",null,unlabel(p)));});g.appendChild(ol);blk.appendChild(g);}
 if(cols&&b.stage!=="guideline"){var grid=el("div","branches");grid.style.gridTemplateColumns="repeat("+cols+",minmax(200px,1fr))";
  var decoding=0;
  for(var k=0;k<cols;k++){var joined=k<b.steps.length,raw=joined?b.steps[k]:(liveCols[k+1]||"");
   var c=el("div","branch"+(joined?"":" live"));c.dataset.branch=k+1;if(!joined)decoding++;
   var h=el("div","bh");h.appendChild(el("b",null,"branch "+(k+1)));if(b.plans[k])h.appendChild(document.createTextNode(" · "+unlabel(b.plans[k])));
   c.appendChild(h);c.appendChild(el("pre","txt step-text",joined?unlabel(raw):branchText(raw)));grid.appendChild(c);}
  if(decoding>=2&&b.stage==="branches")maxLive=Math.max(maxLive,decoding);
  blk.appendChild(grid);}
 if(b.take!=null){var t=el("div","take");t.appendChild(el("div","lbl","takeaway"));t.appendChild(el("pre","txt",b.take.trim()));blk.appendChild(t);}
 box.appendChild(blk);}
function render(turn){
 turn.pending=false;var box=turn.box,items=parse(turn.content),ext=turn.ext;box.textContent="";
 var n=0,lastText=-1;items.forEach(function(it,i){if(it.kind==="text"&&it.text.trim())lastText=i;});
 var anyBlock=items.some(function(it){return it.kind==="block";});
 items.forEach(function(it,i){
  if(it.kind==="block"){renderBlock(box,it,n++,turn.live,ext);return;}
  if(!it.text.trim())return;
  if(i===lastText&&(turn.finish||anyBlock)&&i===items.length-1){var f=el("div","final");f.appendChild(el("div","lbl",anyBlock?"final answer text":"answer"));
   var pre=el("pre","txt");finalText(pre,it.text.trim(),ext?ext.tree.answer:null);f.appendChild(pre);box.appendChild(f);}
  else box.appendChild(el("pre","txt seq",it.text));});
 if(turn.finish){var chips=el("div","chips"),s=ext?ext.stats:{};
  [["finish",turn.finish+(ext&&ext.finish_detail?" ("+ext.finish_detail+")":"")],["answer",ext?ext.tree.answer:null],
   ["tokens",s.generated_tokens],["critical path",s.critical_path_tokens],["parallel blocks",s.parallel_blocks],
   ["branches/block",s.branches_per_block?s.branches_per_block.join(", "):null],["wall s",s.wall_time_s]]
  .forEach(function(c){if(c[1]!=null&&c[1]!=="")chips.appendChild(el("span",null,c[0]+": "+c[1]));});box.appendChild(chips);
  var d=el("details");d.appendChild(el("summary",null,"canonical text"));d.appendChild(el("pre","txt",turn.content));box.appendChild(d);}
 document.body.dataset.liveColumns=String(maxLive);}
function schedule(turn){if(!turn.pending){turn.pending=true;requestAnimationFrame(function(){render(turn);});}}
function onEvent(turn,data){
 if(data==="[DONE]")return;var o=JSON.parse(data);
 if(o.error)throw new Error(o.error.message);
 (o.choices||[]).forEach(function(c){
  if(c.delta&&c.delta.reasoning_content)turn.content+=c.delta.reasoning_content;
  if(c.delta&&c.delta.content){turn.content+=c.delta.content;turn.answer+=c.delta.content;}
  if(c.npr&&c.npr.branches)c.npr.branches.forEach(function(b){var blk=turn.live[b.block]=turn.live[b.block]||{};blk[b.branch]=(blk[b.branch]||"")+b.text;});
  if(c.finish_reason){turn.finish=c.finish_reason;turn.ext=c.npr||null;}});
 schedule(turn);}
async function ask(question){
 var turn={content:"",answer:"",live:{},finish:null,ext:null,pending:false},wrap=el("div","turn");
 wrap.appendChild(el("div","q",question));turn.box=el("div","answer");wrap.appendChild(turn.box);log.appendChild(wrap);
 messages.push({role:"user",content:question});
 var body={model:CFG.model,messages:messages,stream:true,max_tokens:+document.getElementById("max-tokens").value,
  temperature:+document.getElementById("temperature").value};
 busy=new AbortController();send.textContent="Stop";send.className="stop";setState("streaming");
 try{
  var r=await fetch("/v1/chat/completions",{method:"POST",headers:headers(),body:JSON.stringify(body),signal:busy.signal});
  if(!r.ok){var e=await r.json().catch(function(){return {error:{message:r.statusText}};});if(r.status===401)keyBox.hidden=false;
   throw new Error(r.status+": "+e.error.message);}
  var reader=r.body.getReader(),dec=new TextDecoder(),buf="";
  for(;;){var chunk=await reader.read();if(chunk.done)break;buf+=dec.decode(chunk.value,{stream:true});
   var i;while((i=buf.indexOf("\n\n"))>=0){var ev=buf.slice(0,i);buf=buf.slice(i+2);if(ev.indexOf("data: ")===0)onEvent(turn,ev.slice(6));}}
  render(turn);messages.push({role:"assistant",content:turn.answer});setState("done");
 }catch(err){messages.pop();render(turn);
  turn.box.appendChild(el("div","err",err.name==="AbortError"?"stopped: the server cancelled the request":String(err.message||err)));
  setState(err.name==="AbortError"?"done":"error");}
 finally{busy=null;send.textContent="Send";send.className="";input.focus();}}
form.addEventListener("submit",function(e){e.preventDefault();if(busy){busy.abort();return;}
 var q=input.value.trim();if(!q)return;input.value="";ask(q);});
input.addEventListener("keydown",function(e){if(e.key==="Enter"&&!e.shiftKey){e.preventDefault();form.requestSubmit();}});
// The server panel: GET /live every 400 ms; a click follows one request.
var following=null,followTurn=null,followCols=0;
function follow(id,label){following=id;followCols=0;document.body.dataset.follow=id;document.body.dataset.followColumns="0";
 document.getElementById("follow").hidden=false;document.getElementById("follow-title").textContent="Following "+id+": "+label;
 followTurn={content:"",answer:"",live:{},finish:null,ext:null,pending:false,box:document.getElementById("follow-box")};}
function showFollow(f){var c=f.choices[0];if(!c)return;followTurn.content=c.content;followTurn.live={};
 c.branches.forEach(function(b){var blk=followTurn.live[b.block]=followTurn.live[b.block]||{};blk[b.branch]=b.text;});
 followCols=Math.max(followCols,c.branches.length);document.body.dataset.followColumns=String(followCols);schedule(followTurn);}
function showServer(s){var v=s.server,list=document.getElementById("srv-list");
 document.getElementById("srv-stats").textContent="Server: "+v.running+" running · "+v.queued+" queued · KV "+
  v.kv_blocks_used+"/"+v.kv_blocks_total+" blocks ("+(100*v.kv_usage).toFixed(1)+"%) · "+v.steps+" steps · "+
  v.generated_tokens+" tokens generated";
 list.textContent="";
 s.requests.forEach(function(q){var b=el("button","req"+(q.id===following?" on":""));b.type="button";b.dataset.id=q.id;
  b.appendChild(el("b",null,q.state));b.appendChild(document.createTextNode(" "+q.endpoint+" · "+q.label+" · "+
   q.generated_tokens+" tokens"+(q.branches_decoding?" · "+q.branches_decoding+" branches decoding":"")+" · "+
   q.age_s.toFixed(1)+" s"));
  b.addEventListener("click",function(){follow(q.id,q.label);});list.appendChild(b);});
 if(!s.requests.length)list.appendChild(el("span","hint","No request in flight."));
 document.body.dataset.serverRequests=String(s.requests.length);
 if(following&&s.follow)showFollow(s.follow);
 else if(following&&followTurn&&!followTurn.finish){followTurn.finish="ended";
  document.getElementById("follow-title").textContent+=" (ended)";schedule(followTurn);}}
function poll(){fetch("/live"+(following?"?follow="+encodeURIComponent(following):""),{headers:headers()})
 .then(function(r){if(r.status===401){keyBox.hidden=false;throw new Error("key");}return r.json();})
 .then(showServer).catch(function(){}).then(function(){setTimeout(poll,400);});}
poll();
setState("ready");
})();
"""


def chat_page(model_name: str) -> str:
    """The page's HTML; ``model_name`` is what it sends as ``model``."""
    body = (
        '<main class="chat"><p class="hint">Ask a question. Sequential text streams as it is written; each parallel '
        "block shows its branches side by side while they decode, then its takeaway; the answer in "
        '<code>\\boxed{}</code> is marked. <span id="mode"></span></p>'
        '<section class="server"><div id="srv-stats">Server: …</div><div class="srv-list" id="srv-list"></div>'
        '<div class="follow" id="follow" hidden><div class="lbl" id="follow-title"></div>'
        '<div class="answer" id="follow-box"></div></div></section><div id="log"></div></main>'
        '<div class="ask"><div class="opts"><label>max tokens <input id="max-tokens" type="number" min="1" value="512">'
        '</label><label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>'
        '<label id="key-box" hidden>API key <input id="key" type="password" autocomplete="off"></label></div>'
        '<form id="ask"><textarea id="q" placeholder="Ask something (Enter sends, Shift+Enter: new line)" '
        'aria-label="question"></textarea><button id="send" type="submit">Send</button></form></div>'
        f'<script type="application/json" id="npr-config">{script_json({"model": model_name})}</script>'
        f"<script>{CHAT_JS}</script>"
    )
    return page(f"npr serve · {model_name}", body, CHAT_CSS)
